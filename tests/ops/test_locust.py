"""load_tests/locustfile.py: a short headless locust run against the real server streams
without failures and reports TTFT (load_tests/run_locust.py reads the figures)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
from pathlib import Path

LOAD_TESTS = Path(__file__).resolve().parents[2] / "load_tests"


def run_locust_module():
    spec = importlib.util.spec_from_file_location("run_locust", LOAD_TESTS / "run_locust.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headless_locust_run_streams_without_failures(server, tmp_path):
    run_locust = run_locust_module()
    prefix = str(tmp_path / "run")
    cmd = run_locust.locust_cmd(server.base_url, users=4, seconds=20, csv_prefix=prefix)
    assert cmd[cmd.index("-f") + 1] == str(LOAD_TESTS / "locustfile.py")
    env = {**os.environ, "TOKENMILL_MAX_TOKENS": "8"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # locust exits 1 on any failure
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    figures = run_locust.summary(prefix)
    assert figures["streams"] > 0 and figures["failures"] == 0
    assert int(rows["TTFT"]["Request Count"]) == figures["streams"]  # one per stream
    assert 0 < figures["ttft_p50_ms"] <= figures["ttft_p95_ms"]
    assert figures["requests_per_s"] > 0
