"""`--dtype auto` on the CPU: decided by CPU flags or one measurement, then read from disk."""

from __future__ import annotations

import json

import pytest
import torch

from model_runner import cpu_profile
from model_runner.config import EngineConfig, resolve_dtype
from tests.conftest import int8_dot_kernels_run


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    return tmp_path


def _no_measurement(*_):
    raise AssertionError("measured although the flags or the cache settle it")


def test_flags_settle_it_without_measuring(monkeypatch):
    monkeypatch.setattr(cpu_profile, "measure_dtypes", _no_measurement)
    plain = cpu_profile.decide("Old Xeon", ())
    assert (plain.dtype, plain.reason) == ("float32", "no native bf16 instructions")
    amx = cpu_profile.decide("Sapphire Rapids", ("avx512_bf16", "amx_bf16"))
    assert amx.dtype == "bfloat16" and "AMX" in amx.reason


@pytest.mark.parametrize(("bf16_ms", "dtype"), [(3.0, "bfloat16"), (9.5, "float32")])
def test_avx512_bf16_alone_is_measured(monkeypatch, bf16_ms, dtype):
    timings = {f"{k}@{m}": (bf16_ms if k == "bf16" else 10.0) for k in ("fp32", "bf16")
               for m in cpu_profile.DTYPE_ROWS}  # fmt: skip
    monkeypatch.setattr(cpu_profile, "measure_dtypes", lambda: timings)
    profile = cpu_profile.decide("Zen 4", ("avx512_bf16",))
    assert profile.dtype == dtype
    assert f"{bf16_ms / 10:.0%} of fp32" in profile.reason


def test_the_decision_is_cached_per_cpu_model(monkeypatch, cache_dir):
    monkeypatch.setattr(cpu_profile, "cpu_name_and_flags", lambda: ("Zen 4", ("avx512_bf16",)))
    monkeypatch.setattr(cpu_profile, "measure_dtypes", lambda: {
        f"{k}@{m}": (2.0 if k == "bf16" else 10.0) for k in ("fp32", "bf16")
        for m in cpu_profile.DTYPE_ROWS})  # fmt: skip
    first = cpu_profile.cpu_profile()
    assert first.dtype == "bfloat16"
    (cached,) = (cache_dir / "cpu").glob("*.json")
    assert json.loads(cached.read_text())["dtype"]["dtype"] == "bfloat16"
    monkeypatch.setattr(cpu_profile, "measure_dtypes", _no_measurement)
    assert cpu_profile.cpu_profile() == first  # read back, not measured again
    assert resolve_dtype(EngineConfig(device="cpu")) == torch.bfloat16
    assert resolve_dtype(EngineConfig(device="cpu", dtype="float32")) == torch.float32


def test_quantized_crossover_is_cached_per_layout_and_shapes(monkeypatch):
    calls = []

    def fake(shapes, layout):
        calls.append((shapes, layout))
        return {"bf16@1": 3, "int4@1": 1, "bf16@2": 3, "int4@2": 2, "bf16@4": 3, "int4@4": 4}

    monkeypatch.setattr(cpu_profile, "measure_quantized", fake)
    assert cpu_profile.quantized_max_rows([(96, 64)], "int4") == 2
    assert cpu_profile.quantized_max_rows([(96, 64)], "int4") == 2
    assert len(calls) == 1
    assert cpu_profile.quantized_max_rows([(96, 64)], "q4") == 2  # another layout: measured
    assert len(calls) == 2


LAYOUTS = ["int4"] + (["q4", "q8"] if int8_dot_kernels_run() else [])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_real_measurement_runs_and_finds_a_crossover(layout):
    timings = cpu_profile.measure_quantized([(256, 128), (128, 256)], layout)
    assert set(timings) == {f"{k}@{m}" for k in ("bf16", "int4") for m in cpu_profile.INT4_ROWS}
    assert all(t > 0 for t in timings.values())
    assert cpu_profile.crossover(timings) in (0, *cpu_profile.INT4_ROWS)
