"""The overhead of cost attribution: output tok/s with and without `metadata.feature` on
every request, in alternated runs against one server (target: medians within 3%).

    python load_tests/bench_cost_overhead.py --rounds 4 --concurrency 32

NOTE: attribution itself always runs (an untagged request is charged to feature "none"); what
differs is the label's path: parsing, checking, counting per feature.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402


def one_run(base_url: str, args: argparse.Namespace, feature: str | None) -> float:
    argv = ["--base-url", base_url, "--concurrency", str(args.concurrency),
            "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len)]  # fmt: skip
    if feature:
        argv += ["--feature", feature]
    [summary] = bench_serving.main(argv)
    return summary["output_throughput"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--port", type=int, default=8019)
    p.add_argument("--json-out", default=None)
    p.add_argument("server_flags", nargs="*", help="extra `tokenmill serve` flags")
    args = p.parse_args()
    runs: dict[str, list[float]] = {"untagged": [], "tagged": []}
    with running(tokenmill_cmd(args.port, *args.server_flags), args.port, "tokenmill") as url:
        one_run(url, args, None)  # warm-up: compiled steps, prefix cache, allocator
        for i in range(args.rounds):
            order = ("untagged", "tagged") if i % 2 == 0 else ("tagged", "untagged")
            for kind in order:
                runs[kind].append(one_run(url, args, "bench-feature" if kind == "tagged" else None))
    medians = {kind: statistics.median(values) for kind, values in runs.items()}
    ratio = medians["tagged"] / medians["untagged"]
    print(f"output tok/s at concurrency {args.concurrency}, {args.rounds} alternated rounds")
    for kind, values in runs.items():
        print(f"  {kind:9s} median {medians[kind]:7.1f}  runs {[round(v, 1) for v in values]}")
    print(f"  tagged / untagged: {ratio:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": runs, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
