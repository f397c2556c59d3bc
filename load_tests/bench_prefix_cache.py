"""Prefix-caching benchmark (issue 4): 64 requests sharing a ~1,000-token system prompt.

Each request adds a distinct ~50-token question and generates 32 tokens (`ignore_eos`). One
warm-up request with the same system prompt runs first, so with caching on every timed
request is a cache hit. Reports TTFT p50, total time and the share of prompt tokens served
from cache (`usage.prompt_tokens_details.cached_tokens`).

    # two servers, caching on (8000) and off (8001, --no-enable-prefix-caching):
    python load_tests/bench_prefix_cache.py --base-url http://127.0.0.1:8000 \\
        --baseline-url http://127.0.0.1:8001

Any bench_serving.py flag may be added (e.g. --concurrency 16, --endpoint completions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402

DEFAULTS = [
    "--num-requests", "64", "--shared-prefix-len", "1000", "--input-len", "50",
    "--output-len", "32", "--concurrency", "8",
]  # fmt: skip


def run_one(base_url: str, extra: list[str]) -> dict:
    summary = bench_serving.main(DEFAULTS + ["--base-url", base_url] + extra)[0]
    hit = summary["cached_prompt_tokens"] / max(
        summary["mean_prompt_tokens"] * summary["completed"], 1
    )
    print(
        f"{base_url}: TTFT p50 {summary['ttft_ms']['p50']:.1f} ms, total "
        f"{summary['total_time_s']:.2f} s, cached prompt tokens {hit:.0%}\n"
    )
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="caching on")
    p.add_argument("--baseline-url", default=None, help="the same model, caching off")
    p.add_argument("--json-out", default=None)
    args, extra = p.parse_known_args()
    result = {"cached": run_one(args.base_url, extra)}
    if args.baseline_url:
        result["baseline"] = run_one(args.baseline_url, extra)
        on, off = result["cached"], result["baseline"]
        cut = 1 - on["ttft_ms"]["p50"] / off["ttft_ms"]["p50"]
        speedup = off["total_time_s"] / on["total_time_s"]
        result["ttft_p50_cut"] = cut
        print(f"TTFT p50 cut by caching: {cut:.0%} (target >= 60%); total time x{speedup:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
