"""load_tests/soak.py for a minute against its own server: every kind of traffic, nothing
lost or stuck, every idle check passed, and enough process samples for the slopes.

NOTE: the slopes' pass/fail is left out here; a minute is mostly warm-up (the engine's
RSS still grows), so only their presence is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROCESSES = ("api", "engine", "tokenizer", "detokenizer")


def test_one_minute_soak_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "load_tests" / "soak.py"), "--duration", "60",
           "--warmup", "20", "--sample-interval", "10", "--idle-every", "30",
           "--concurrency", "4", "--max-tokens", "16", "--drain-wait", "0",
           "--out", str(out), "--server-log", str(tmp_path / "server.log")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["lost"], report["stuck"], report["http_5xx"], report["unexpected"]) == (
        0, 0, 0, 0), report["requests"]["failed_examples"]  # fmt: skip
    checks = report["invariant_checks"]
    assert len(checks) >= 2 and all(c["ok"] for c in checks), checks  # one mid-run, one at the end
    by_kind = report["requests"]["by_kind"]
    assert all(sum(counts.values()) for counts in by_kind.values()), by_kind
    assert by_kind["bad"] == {"rejected": sum(by_kind["bad"].values())}
    for name in PROCESSES:
        p = report["processes"][name]
        assert p["num_samples"] >= 3 and len(p["pids"]) == 1, (name, p["num_samples"], p["pids"])
        assert p["rss_slope_mib_per_min"] is not None and p["fd_slope_per_min"] is not None
    assert report["latency_windows"] and report["latency_windows"][0]["e2e_p99_ms"] > 0
    assert proc.returncode == (0 if report["passed"] else 1), proc.stderr[-3000:]
