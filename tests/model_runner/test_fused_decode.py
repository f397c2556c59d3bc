"""The fused decode path (one C++ call per layer): where it applies, and logits that agree
with the eager forward on the same int8-dot weights."""

from __future__ import annotations

import pytest
import torch

from model_runner.compiled_decode import CompiledDecode
from model_runner.config import EngineConfig
from model_runner.fused_decode import FusedDecode
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from tests.conftest import needs_int8_dot
from tests.model_runner.driver import beside_eager
from tests.model_runner.test_tiny_models import COMMON, PROMPTS

pytestmark = needs_int8_dot


def _runner(tmp_path, **overrides) -> ModelRunner:
    import transformers

    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    options = {"quantization": "int4", "cpu_int4_max_rows": 4, "cpu_quant_kernel": "int8-dot"}
    config = EngineConfig(load_format="dummy", hf_config_path=str(tmp_path), dtype="bfloat16",
                          kv_cache_memory=0.01, **{**options, **overrides})  # fmt: skip
    return ModelRunner(config, progress=False)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    return _runner(tmp_path_factory.mktemp("tiny"))


def test_it_is_built_only_where_it_applies(runner, tmp_path):
    assert isinstance(runner.paths.compiled, FusedDecode) and runner.paths.compiled.max_rows == 4
    assert runner.linear_plan.kernel == "int8-dot"
    assert _runner(tmp_path / "a", enforce_eager=True).paths.compiled is None
    assert _runner(tmp_path / "b", batch_invariant=True).paths.compiled is None
    torch_int4 = _runner(tmp_path / "c", cpu_quant_kernel="int4").paths.compiled
    assert isinstance(torch_int4, CompiledDecode)  # torch's GEMM: the compiled layer instead
    assert _runner(tmp_path / "d", quantization="none").paths.compiled is None


def test_fused_steps_agree_with_eager_ones(runner):
    """Every decode step of up to max_rows rows runs fused, the first one after a prefill
    (the context gathered from the paged cache) included."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # three rows of three lengths, then six rows > max_rows: eager only
    seen = beside_eager(runner, runner.paths.compiled, [PROMPTS[:1], PROMPTS, PROMPTS * 2], params)
    assert {len(out) for _, out in seen} == {1, 3}
    assert len(seen) == 2 * 11
    for eager, out in seen:
        assert out.shape == eager.shape
        torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05 * float(eager.std()))
        assert bool((out.argmax(-1) == eager.argmax(-1)).all())
