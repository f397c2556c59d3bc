"""Serving benchmark: streamed OpenAI-compatible requests at a fixed concurrency.

Measures per request the time to first token (TTFT), the gaps between streamed chunks (ITL)
and the end-to-end latency (E2E); per run the output tokens/s and requests/s. Token counts
come from the final usage chunk (`stream_options.include_usage`); `ignore_eos` (a vLLM extra
field) makes every request produce exactly `--output-len` tokens.

    python load_tests/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --sweep 1,8,32 --num-requests 64 --input-len 64 --output-len 64 --json-out out.json

`--shared-prefix-len 1000 --input-len 50` sends one shared system prompt plus a distinct
question per request (the prefix-caching workload; see bench_prefix_cache.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import make_prompts, make_questions, prompts_from_file, shared_prefix  # noqa: E402


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds)."""

    ok: bool
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stamps: list[float] = field(default_factory=list)  # perf_counter of each output chunk


def build_payloads(args: argparse.Namespace, model: str, level: int) -> list[dict]:
    """Request bodies for one run; a different seed per level so runs share no prompts."""
    seed = args.seed + 1000 * (level + 1)
    n = args.num_requests
    if args.prompt_file:
        users = prompts_from_file(args.prompt_file, n)
    elif args.shared_prefix_len:
        users = make_questions(n, args.input_len, seed)
    else:
        users = make_prompts(n, args.input_len, seed)
    system = shared_prefix(args.shared_prefix_len, args.seed) if args.shared_prefix_len else None
    models = model.split(",")  # NOTE: several (e.g. LoRA adapters): requests take turns
    return [make_payload(args, models[i % len(models)], u, system) for i, u in enumerate(users)]


def make_payload(args: argparse.Namespace, model: str, user: str, system: str | None) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.feature:
        body["metadata"] = {"feature": args.feature}
    if args.endpoint == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        body["messages"] = messages + [{"role": "user", "content": user}]
    else:
        body["prompt"] = f"{system}\n\n{user}" if system else user
    return body


def chunk_has_output(chunk: dict) -> bool:
    """True for a chunk that carries generated output (not the role-only or usage chunk)."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
        if choice.get("token_ids"):  # --skip-tokenizer-init: ids, empty text
            return True
        if delta.get("reasoning_content") or choice.get("finish_reason"):
            return True
    return False


async def send_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """Send one streamed request; timestamps every chunk that carries output."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ok=False, error=json.dumps(chunk["error"])[:200])
                if chunk_has_output(chunk):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not stamps:
        return RequestResult(ok=False, e2e=end - start, error="no output chunk")
    details = usage.get("prompt_tokens_details") or {}
    return RequestResult(
        ok=True,
        ttft=stamps[0] - start,
        itls=[b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)],
        e2e=end - start,
        prompt_tokens=usage.get("prompt_tokens", 0),
        output_tokens=usage.get("completion_tokens", len(stamps)),
        cached_tokens=details.get("cached_tokens") or 0,
        stamps=stamps,
    )


async def run_level(
    client: httpx.AsyncClient, url: str, payloads: list[dict], concurrency: int
) -> tuple[list[RequestResult], float]:
    """Run every payload with at most `concurrency` in flight; returns results, wall time."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in payloads:
        queue.put_nowait(body)
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await send_one(client, url, queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(payloads)))))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    mean = sum(ms) / len(ms) if ms else float("nan")
    return {"mean": mean, **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def summarize(results: list[RequestResult], total: float, concurrency: int, out_len: int) -> dict:
    """The run's figures: throughputs and TTFT/ITL/TPOT/E2E percentiles in milliseconds."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "total_time_s": total,
        "request_throughput": len(ok) / total,
        "output_throughput": out_tokens / total,
        "total_token_throughput": (out_tokens + in_tokens) / total,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": in_tokens / len(ok) if ok else 0.0,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "output_len_mismatches": sum(r.output_tokens != out_len for r in ok),
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itls]),
        "tpot_ms": stats_ms(tpots),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
    }


def print_table(summaries: list[dict]) -> None:
    head = (
        f"{'conc':>5} {'ok/all':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
        f"{'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} {'p99':>7} {'E2E p50':>9} {'total s':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for s in summaries:
        t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        print(
            f"{s['concurrency']:>5} {s['completed']:>4}/{s['num_requests']:<3} "
            f"{s['request_throughput']:>7.2f} {s['output_throughput']:>10.1f} "
            f"{t['p50']:>9.1f} {t['p90']:>8.1f} {t['p99']:>8.1f} {i['p50']:>8.1f} "
            f"{i['p90']:>7.1f} {i['p99']:>7.1f} {e['p50']:>9.1f} {s['total_time_s']:>8.2f}"
        )
    print("(times in ms; out tok/s counts usage.completion_tokens over the run's wall time)")
    for s in summaries:
        for err in s["errors"]:
            print(f"  conc {s['concurrency']}: {err}")
        if s["output_len_mismatches"]:
            print(f"  conc {s['concurrency']}: {s['output_len_mismatches']} off --output-len")


async def detect_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(f"{base_url}/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_benchmark(args: argparse.Namespace) -> list[dict]:
    """Warm up, then one run per concurrency level; returns the summaries."""
    base = args.base_url.rstrip("/")
    url = f"{base}/v1/chat/completions" if args.endpoint == "chat" else f"{base}/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.concurrency]
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(
        headers=headers, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        model = args.model or await detect_model(client, base)
        warm = build_payloads(args, model, level=-1)[: args.warmup]
        for body in warm:
            result = await send_one(client, url, body)
            if not result.ok:
                raise SystemExit(f"warm-up request failed: {result.error}")
        summaries = []
        for level, conc in enumerate(levels):
            payloads = build_payloads(args, model, level)
            results, total = await run_level(client, url, payloads, conc)
            summary = summarize(results, total, conc, args.output_len)
            if args.save_requests:
                summary["requests"] = [asdict(r) for r in results]
            summaries.append(summary)
    return summaries


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--model", default=None,
        help="default: the first of /v1/models; a comma-separated list: requests take turns",
    )  # fmt: skip
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sweep", default=None, help="comma-separated concurrencies, e.g. 1,8,32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64, help="prompt (or question) tokens")
    p.add_argument(
        "--prompt-file",
        default=None,
        help="one prompt per line (.jsonl: one JSON string per line), cycled",
    )
    p.add_argument("--shared-prefix-len", type=int, default=0, help="shared system prompt")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--feature", default=None, help="metadata.feature on every request")
    p.add_argument("--warmup", type=int, default=1, help="requests sent before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json-out", default=None)
    p.add_argument("--save-requests", action="store_true", help="per-request data in JSON")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    summaries = asyncio.run(run_benchmark(args))
    print_table(summaries)
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"config": vars(args), "runs": summaries}, indent=2)
        )
    return summaries


if __name__ == "__main__":
    main()
