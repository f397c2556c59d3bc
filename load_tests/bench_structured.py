"""Issue 11's figures: what structured output and tool calling cost a served request.

Against a running server (the default model on the CPU), in one script run so that every
ratio compares runs taken side by side on this drifting machine:

1. Output tok/s at `--concurrency` (16) with `--output-len` (64) tokens per request, every
   request under one cached JSON schema, against the same requests unconstrained; plain
   and grammar runs alternate, `--rounds` of each, and the ratio is the median of the
   per-round ratios. The schema asks for a long string, so grammar requests also produce
   exactly `--output-len` tokens (their JSON is cut there; validity is tested elsewhere).
2. TTFT added by a cached grammar, and by a first compile of a 10-property schema (fresh
   property names every time): sequential requests, alternating with plain ones; medians.
3. ITL p99 of 8 plain streams while a 64-tool `required` request compiles (fresh tool names
   every round), against the same 8 streams alone. Only the gaps inside the window from the
   request's send until the server reports the compile (`tokenmill:grammar_compiles_total`
   polled every 20 ms: validation, tokenizing, compiling) count; the request is then
   dropped (the client disconnects), so its long prefill does not enter the figure.

    tokenmill serve --port 8000 &
    python load_tests/bench_structured.py --base-url http://127.0.0.1:8000 --json-out s.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving as bs  # noqa: E402
from prompts import make_prompts  # noqa: E402

STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 600}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
TYPES = ["string", "integer", "boolean", "number"]


def ten_properties(tag: str) -> dict:
    """A 10-property schema whose property names make it new to the grammar cache."""
    properties = {f"{tag}_field_{i}": {"type": TYPES[i % 4]} for i in range(10)}
    return {"type": "object", "properties": properties, "required": list(properties)}


def many_tools(count: int, tag: str) -> list[dict]:
    """`count` tools whose arguments differ (little for the compiler to share), in a prompt
    of ~50 tokens each."""
    tools = []
    for i in range(count):
        args = {f"a{j}": {"type": TYPES[(i + j) % 4]} for j in range(3)}
        args["mode"] = {"enum": [f"v{i}{k}" for k in range(3)]}
        parameters = {"type": "object", "properties": args, "required": ["a0", "mode"]}
        tools.append({"type": "function", "function": {"name": f"{tag}_{i}", "parameters":
                                                       parameters}})  # fmt: skip
    return tools


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


class Bench:
    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace, model: str):
        self.client, self.args, self.model = client, args, model
        self.url = args.base_url.rstrip("/") + "/v1/chat/completions"
        self.seed = args.seed

    def bodies(self, count: int, output_len: int, **extra) -> list[dict]:
        """Chat bodies with fresh prompts (no prefix-cache hits between runs)."""
        self.seed += 1
        opts = argparse.Namespace(output_len=output_len, temperature=0.0, ignore_eos=True,
                                  endpoint="chat")  # fmt: skip
        prompts = make_prompts(count, self.args.input_len, self.seed)
        return [{**bs.make_payload(opts, self.model, p, None), **extra} for p in prompts]

    async def metrics(self, *names: str) -> list[float]:
        """The values of `tokenmill:<name>` for each name, from one scrape."""
        text = (await self.client.get(self.args.base_url.rstrip("/") + "/metrics")).text
        matches = [re.search(rf"^tokenmill:{n}\S* (\S+)$", text, re.M) for n in names]
        return [float(m.group(1)) if m else 0.0 for m in matches]

    async def metric(self, name: str) -> float:
        return (await self.metrics(name))[0]

    async def compiled_after(self, count: float) -> float:
        """The time `tokenmill:grammar_compiles_total` is first seen above `count`."""
        while await self.metric("grammar_compiles_total") <= count:
            await asyncio.sleep(0.02)
        return time.perf_counter()

    async def one(self, body: dict) -> bs.RequestResult:
        result = await bs.send_one(self.client, self.url, body)
        if not result.ok:
            raise SystemExit(f"request failed: {result.error}")
        return result

    async def throughput(self) -> dict:
        a = self.args
        rounds = []
        for _ in range(a.rounds):
            run = {}
            for name, extra in (
                ("plain", {}),
                ("grammar", {"response_format": json_schema_format(STORY_SCHEMA)}),
            ):
                bodies = self.bodies(a.num_requests, a.output_len, **extra)
                results, total = await bs.run_level(self.client, self.url, bodies, a.concurrency)
                run[name] = bs.summarize(results, total, a.concurrency, a.output_len)
            rounds.append(run)
        ratios = [r["grammar"]["output_throughput"] / r["plain"]["output_throughput"]
                  for r in rounds]  # fmt: skip
        return {"rounds": rounds, "ratio_median": statistics.median(ratios), "ratios": ratios}

    async def ttft(self) -> dict:
        plain, cached, first = [], [], []
        await self.one(self.bodies(1, 4, response_format=json_schema_format(STORY_SCHEMA))[0])
        for i in range(self.args.ttft_requests):
            plain.append((await self.one(self.bodies(1, 4)[0])).ttft)
            body = self.bodies(1, 4, response_format=json_schema_format(STORY_SCHEMA))[0]
            cached.append((await self.one(body)).ttft)
            fresh = json_schema_format(ten_properties(f"t{self.seed}x{i}"))
            first.append((await self.one(self.bodies(1, 4, response_format=fresh)[0])).ttft)
        ms = [statistics.median(v) * 1000 for v in (plain, cached, first)]
        return {"plain_ttft_ms": ms[0], "cached_grammar_ttft_ms": ms[1],
                "first_compile_ttft_ms": ms[2], "cached_added_ms": ms[1] - ms[0],
                "first_compile_added_ms": ms[2] - ms[0]}  # fmt: skip

    async def itl_under_compile(self) -> dict:
        """Gaps of 8 streams from the tool request's send until its compile is reported
        (validation, tokenizing and the compile; its prefill comes after), then the same
        window of 8 streams alone."""
        a = self.args
        alone, during, windows, compiles = [], [], [], []
        for r in range(a.rounds):
            for with_tools in (True, False):
                streams = [asyncio.create_task(self.one(b)) for b in self.bodies(8, a.itl_len)]
                await asyncio.sleep(a.compile_delay)
                count, seconds = await self.metrics(
                    "grammar_compiles_total", "grammar_compile_seconds_total"
                )
                sent = time.perf_counter()
                if with_tools:
                    tools = many_tools(64, f"r{r}s{self.seed}")
                    body = {**self.bodies(1, 1)[0], "tools": tools, "tool_choice": "required"}
                    request = asyncio.create_task(self.one(body))
                    windows.append(await self.compiled_after(count) - sent)
                    compiles.append(await self.metric("grammar_compile_seconds_total") - seconds)
                    request.cancel()  # NOTE: its ~7k-token prefill is not the compile's cost
                    await asyncio.gather(request, return_exceptions=True)
                else:
                    while time.perf_counter() < sent + windows[-1]:
                        await self.metric("grammar_compiles_total")  # the same polling load
                        await asyncio.sleep(0.02)
                gaps = gaps_in(await asyncio.gather(*streams), (sent, sent + windows[-1]))
                (during if with_tools else alone).extend(gaps)
        p99 = [bs.percentile(g, 99) * 1000 for g in (alone, during)]
        return {"itl_p99_alone_ms": p99[0], "itl_p99_during_compile_ms": p99[1],
                "ratio": p99[1] / p99[0], "compile_s": compiles, "window_s": windows,
                "gaps": [len(alone), len(during)]}  # fmt: skip


def gaps_in(results: list[bs.RequestResult], window: tuple[float, float]) -> list[float]:
    """The inter-chunk gaps that end inside `window`."""
    return [b - a for r in results for a, b in zip(r.stamps[:-1], r.stamps[1:], strict=True)
            if window[0] <= b <= window[1]]  # fmt: skip


async def run(args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=2.0)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = await bs.detect_model(client, args.base_url.rstrip("/"))
        bench = Bench(client, args, model)
        await bench.one(bench.bodies(1, 8)[0])  # warm-up
        out = {}
        for name, phase in (("throughput", bench.throughput), ("ttft", bench.ttft),
                            ("itl", bench.itl_under_compile)):  # fmt: skip
            if name not in args.phases.split(","):
                continue
            start = time.perf_counter()
            out[name] = await phase()
            print(f"[{name} done in {time.perf_counter() - start:.0f} s]", flush=True)
        return out


def _listed(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _report_throughput(t: dict) -> None:
    for n, r in enumerate(t["rounds"]):
        print(f"round {n}: plain {r['plain']['output_throughput']:.1f} tok/s, grammar "
              f"{r['grammar']['output_throughput']:.1f} tok/s")  # fmt: skip
    print(f"grammar / plain output tok/s: median {t['ratio_median']:.3f} "
          f"(rounds {_listed(t['ratios'], 3)})")  # fmt: skip


def _report_ttft(f: dict) -> None:
    print(f"TTFT plain {f['plain_ttft_ms']:.1f} ms, cached grammar "
          f"{f['cached_grammar_ttft_ms']:.1f} ms (+{f['cached_added_ms']:.1f}), first "
          f"compile of 10 properties {f['first_compile_ttft_ms']:.1f} ms "
          f"(+{f['first_compile_added_ms']:.1f})")  # fmt: skip


def _report_itl(i: dict) -> None:
    print(f"ITL p99 of 8 streams: alone {i['itl_p99_alone_ms']:.1f} ms, while a 64-tool "
          f"grammar compiles {i['itl_p99_during_compile_ms']:.1f} ms (x{i['ratio']:.2f}; "
          f"compiles {_listed(i['compile_s'], 2)} s in windows of "
          f"{_listed(i['window_s'], 2)} s; gaps {i['gaps']})")  # fmt: skip


REPORTS = {"throughput": _report_throughput, "ttft": _report_ttft, "itl": _report_itl}


def report(out: dict) -> None:
    for name, print_phase in REPORTS.items():
        if name in out:
            print_phase(out[name])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=32, help="per throughput run")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ttft-requests", type=int, default=8, help="of each kind")
    p.add_argument(
        "--itl-len",
        type=int,
        default=400,
        help="tokens of each of the 8 streams (they must outlast the window)",
    )
    p.add_argument(
        "--compile-delay",
        type=float,
        default=1.0,
        help="seconds after the 8 streams start before the tool request",
    )
    p.add_argument("--phases", default="throughput,ttft,itl", help="which figures to measure")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json-out", default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    out = asyncio.run(run(args))
    report(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"config": vars(args), **out}, indent=2))
    return out


if __name__ == "__main__":
    main()
