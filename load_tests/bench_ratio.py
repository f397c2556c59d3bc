"""Issue 2's floor, side by side: tokenmill at concurrency 32 over HF sequential `generate`.

This machine kind drifts (the same decode step has taken 81 ms and 150 ms half an hour
apart), so a ratio only means something between runs taken back to back. The script
alternates HF sequential, a fresh `tokenmill serve` with one `bench_serving` run, HF
sequential, ... and divides each tokenmill run by the mean of the two HF runs beside it.
The server is stopped before HF runs, so neither shares the CPU with the other.

    python load_tests/bench_ratio.py --dtype float32 --rounds 4 --json-out ratio.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_hf  # noqa: E402
import bench_serving  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402


def hf_sequential(args: argparse.Namespace) -> float:
    """HF sequential tok/s over `--num-sequential` requests (no batch run)."""
    hf_args = bench_hf.parser().parse_args(
        [
            "--dtype",
            args.dtype,
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--num-sequential",
            str(args.num_sequential),
            "--num-batches",
            "0",
        ]
    )
    return bench_hf.bench_dtype(hf_args, bench_hf.default_gguf(), args.dtype)["sequential_tok_s"]


def tokenmill_run(args: argparse.Namespace) -> dict:
    """Start `tokenmill serve`, run one benchmark level, stop it; returns the summary."""
    cmd = tokenmill_cmd(args.port, "--dtype", args.dtype)
    with running(cmd, args.port, "tokenmill", args.start_timeout) as base_url:
        (summary,) = bench_serving.main(
            [
                "--base-url",
                base_url,
                "--endpoint",
                "completions",
                "--concurrency",
                str(args.concurrency),
                "--num-requests",
                str(args.num_requests),
                "--input-len",
                str(args.input_len),
                "--output-len",
                str(args.output_len),
                "--warmup",
                "2",
            ]
        )
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=4, help="tokenmill runs (HF runs: rounds + 1)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-sequential", type=int, default=4, help="HF requests per HF run")
    p.add_argument("--port", type=int, default=8017)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    hf = [hf_sequential(args)]
    runs = []
    for _ in range(args.rounds):
        runs.append(tokenmill_run(args))
        hf.append(hf_sequential(args))
    rows = []
    for i, run in enumerate(runs):
        baseline = (hf[i] + hf[i + 1]) / 2
        tok_s = run["output_throughput"]
        rows.append({"tokenmill_tok_s": tok_s, "hf_tok_s": baseline, "ratio": tok_s / baseline})
    print(
        f"\n{args.dtype}, concurrency {args.concurrency}, {args.num_requests} requests, "
        f"{args.input_len} prompt + {args.output_len} output tokens"
    )
    print(f"{'round':>5} {'tokenmill tok/s':>16} {'HF seq tok/s':>13} {'ratio':>6}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>5} {r['tokenmill_tok_s']:>16.1f} {r['hf_tok_s']:>13.1f} {r['ratio']:>6.2f}")
    median = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio {median:.2f}x (HF sequential runs: {', '.join(f'{x:.1f}' for x in hf)})")
    out = {"config": vars(args), "hf_sequential_tok_s": hf, "rounds": rows, "median": median}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
