"""`load_tests/bench_cpu_decode.py` runs and reports every case it was asked for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import needs_int8_dot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "load_tests"))

import bench_cpu_decode  # noqa: E402

pytestmark = needs_int8_dot


def test_a_short_run_times_every_case(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    argv = "--layers 2 --reps 2 --rows 1,3 --context 40,5".split() + ["--json", str(out)]
    assert bench_cpu_decode.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["layers_ms"]) == {f"rows={r} context={c}" for r in (1, 3) for c in (5, 40)}
    assert set(result["lm_head_ms"]) == {"rows=1", "rows=3"}
    assert all(0 < t < 1e4 for t in [*result["layers_ms"].values(), *result["lm_head_ms"].values()])
    table = capsys.readouterr().out
    assert "attention at ctx 40" in table and table.count("\n") == 4
