"""The compiled decode path: where it applies, and logits that agree with the eager path.

It runs torch's int4 GEMM (pinned here: where the int8-dot kernels run, `auto` takes them
and the fused decode path instead, tests/model_runner/test_fused_decode.py)."""

from __future__ import annotations

import pytest
import torch

from model_runner.config import EngineConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from tests.model_runner.driver import beside_eager
from tests.model_runner.test_tiny_models import COMMON, PROMPTS


def _runner(tmp_path, **overrides) -> ModelRunner:
    import transformers

    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    config = EngineConfig(
        load_format="dummy", hf_config_path=str(tmp_path), dtype="bfloat16",
        quantization="int4", cpu_int4_max_rows=4, kv_cache_memory=0.01, cpu_quant_kernel="int4",
        **overrides,
    )  # fmt: skip
    return ModelRunner(config, progress=False)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    return _runner(tmp_path_factory.mktemp("tiny"))


def test_it_is_built_only_where_it_applies(runner, tmp_path):
    assert runner.paths.compiled is not None and runner.paths.compiled.enabled
    assert runner.paths.compiled.max_rows == 4
    assert _runner(tmp_path / "a", enforce_eager=True).paths.compiled is None
    assert _runner(tmp_path / "b", batch_invariant=True).paths.compiled is None
    fp32 = EngineConfig(load_format="dummy", hf_config_path=str(tmp_path / "a"), dtype="float32",
                        kv_cache_memory=0.01)  # fmt: skip
    assert ModelRunner(fp32, progress=False).paths.compiled is None  # the exact mode stays eager


def test_compiled_steps_agree_with_eager_ones_without_recompiling(runner):
    """After the warm-up, serving shapes (any rows up to max_rows, any context length) reuse
    its two graphs: a recompile would stall a live step for seconds."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        # one row: the graph without a mask; three rows of three lengths: masked; six rows >
        # max_rows: eager only
        seen = beside_eager(
            runner, runner.paths.compiled, [PROMPTS[:1], PROMPTS, PROMPTS * 2], params
        )
    rows = {len(out) for _, out in seen}
    assert rows == {1, 3}  # the first step after a prefill gathers: eager as well
    assert len(seen) == 2 * 10
    for eager, out in seen:
        assert out.shape == eager.shape
        torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05 * float(eager.std()))
        assert bool((out.argmax(-1) == eager.argmax(-1)).all())
