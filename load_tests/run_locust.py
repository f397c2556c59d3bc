"""16 locust users streaming chats for N seconds; prints requests/s, TTFT p50/p95, failures.

    python load_tests/run_locust.py --seconds 60                    # starts its own server
    python load_tests/run_locust.py --base-url http://127.0.0.1:8000 --seconds 60

Without `--base-url` it serves the default model on a free port (`--tokenmill-flag` passes
a serve flag, e.g. `--tokenmill-flag=--dtype=float32`). The users are locustfile.py's.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from servers import running, tokenmill_cmd  # noqa: E402


def locust_cmd(base_url: str, users: int, seconds: int, csv_prefix: str) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
        "-u", str(users), "-r", str(users), "--run-time", f"{seconds}s",
        "--csv", csv_prefix, "--host", base_url, "--only-summary",
    ]  # fmt: skip


def summary(csv_prefix: str) -> dict:
    """The figures of a run from locust's `<prefix>_stats.csv`."""
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total, ttft = rows["Aggregated"], rows["TTFT"]
    stream = rows["/v1/chat/completions (stream)"]
    return {
        "streams": int(stream["Request Count"]),
        "requests_per_s": float(stream["Requests/s"]),
        "failures": int(total["Failure Count"]),
        "ttft_p50_ms": float(ttft["50%"]),
        "ttft_p95_ms": float(ttft["95%"]),
    }


def run(base_url: str, users: int, seconds: int, max_tokens: int, csv_prefix: str) -> dict:
    env = {**os.environ, "TOKENMILL_MAX_TOKENS": str(max_tokens)}
    cmd = locust_cmd(base_url, users, seconds, csv_prefix)
    subprocess.run(cmd, env=env, check=False, timeout=seconds + 120)
    return summary(csv_prefix)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="default: start a server")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tokenmill-flag", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "run")
        if args.base_url:
            s = run(args.base_url, args.users, args.seconds, args.max_tokens, prefix)
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with running(tokenmill_cmd(port, *args.tokenmill_flag), port, "tokenmill") as url:
                s = run(url, args.users, args.seconds, args.max_tokens, prefix)
    print(
        f"{args.users} users, {args.seconds} s: {s['streams']} streams, "
        f"{s['requests_per_s']:.2f} requests/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
        f"p95 {s['ttft_p95_ms']:.0f} ms, {s['failures']} failures"
    )


if __name__ == "__main__":
    main()
