"""`load_tests/gpu_suite.sh --dry-run`: every step of the GPU suite on the tiny config on the
CPU, one JSON and one Markdown table written, each figure present and sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(REPO / "load_tests" / "gpu_suite.sh"), str(out), "--dry-run",
                           "--budget-s", "170"], env=env, capture_output=True, text=True,
                          timeout=200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    steps = data["steps"]
    assert data["dry_run"] and set(steps) == {"pytest_gpu", "offline", "decode_step", "serving",
                                              "hf"}  # fmt: skip
    assert not [k for k, v in steps.items() if "error" in v or "skipped" in v], steps
    assert steps["pytest_gpu"]["returncode"] == 0
    n = data["sizes"]["n"]
    for name in ("decode_heavy", "prefill_heavy", "sharegpt"):
        assert steps["offline"][name]["requests"] == n and steps["offline"][name]["req_per_s"] > 0
    decode_out = data["sizes"]["decode"][1]
    assert steps["offline"]["decode_heavy"]["output_tokens"] == n * decode_out  # ignore_eos
    for batch in data["sizes"]["batches"]:
        r = steps["decode_step"][f"eager/b{batch}"]
        assert r["ms_per_step"] > 0 and r["floor_ms"] > 0 and 0 <= r["idle_share"] <= 1
    serving = steps["serving"]
    assert serving["startup_s"] > 0
    for rate in data["sizes"]["rates"]:
        r = serving[f"rate_{rate:g}"]
        assert r["failed"] == 0 and r["completed"] == data["sizes"]["serve_n"], r
        assert r["ttft_ms"]["p50"] > 0
    assert steps["hf"]["decode_heavy"]["req_per_s"] > 0
    table = (out / "gpu_suite.md").read_text()
    assert "CPU dry run" in table and "| decode step, ctx 32, batch 4, eager, ms |" in table
    assert "vLLM 0.6.0 31.0" in table and "not measured" not in table
    assert len(table.splitlines()) >= 4 + 1 + 3 + 2 + 2 + 1
