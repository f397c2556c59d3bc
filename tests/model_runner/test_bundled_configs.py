"""The model configs shipped for `--load-format dummy`: exact published shapes, selectable by
name, random weights drawn on the model's device that keep activations finite."""

from __future__ import annotations

import pytest
import torch

from model_runner.config import EngineConfig
from model_runner.model_source import (
    ModelSourceError,
    bundled_config_names,
    model_config_from_hf,
    resolve_hf_config_path,
    resolve_model,
)
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from tests.model_runner.driver import generate


def _params(mc) -> int:
    """Parameter count of a Llama-family model (biases of Qwen2's q/k/v included)."""
    h, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    attn = h * mc.num_heads * mc.head_dim * 2 + h * kv * 2
    if mc.attention_bias:
        attn += mc.num_heads * mc.head_dim + 2 * kv
    mlp = 3 * h * mc.intermediate_size
    layer = attn + mlp + 2 * h
    head = 0 if mc.tie_word_embeddings else mc.vocab_size * h
    return mc.num_layers * layer + mc.vocab_size * h + head + h


def test_shipped_names():
    assert bundled_config_names() == ["llama-3.1-8b", "qwen2.5-7b", "tiny-llama"]


def test_llama_3_1_8b_shape():
    mc = model_config_from_hf(resolve_hf_config_path("llama-3.1-8b"))
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads) == (4096, 32, 32, 8)
    assert (mc.head_dim, mc.intermediate_size, mc.vocab_size) == (128, 14336, 128256)
    assert (mc.rope_theta, mc.max_position_embeddings) == (500000.0, 131072)
    assert mc.rope_scaling["rope_type"] == "llama3" and not mc.tie_word_embeddings
    assert _params(mc) == 8_030_261_248


def test_qwen2_5_7b_shape():
    mc = model_config_from_hf(resolve_hf_config_path("qwen2.5-7b"))
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads) == (3584, 28, 28, 4)
    assert (mc.head_dim, mc.intermediate_size, mc.vocab_size) == (128, 18944, 152064)
    assert (mc.rope_theta, mc.max_position_embeddings) == (1000000.0, 131072)
    assert mc.architecture == "qwen2" and mc.attention_bias and mc.sliding_window is None
    assert _params(mc) == 7_615_616_512


def test_name_resolves_without_a_model():
    source = resolve_model(EngineConfig(load_format="dummy", hf_config_path="tiny-llama"))
    assert source.format == "dummy" and source.name == "tiny-llama"
    assert source.config_path.name == "config.json"
    assert source.config_path.parent.name == "tiny-llama"


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(tmp_path)
    transformers.LlamaConfig(vocab_size=77, hidden_size=32, num_attention_heads=2,
                             num_hidden_layers=1, intermediate_size=64).save_pretrained(
        tmp_path / "tiny-llama")  # fmt: skip
    found = resolve_hf_config_path("tiny-llama").resolve()
    assert found == (tmp_path / "tiny-llama" / "config.json").resolve()


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ModelSourceError, match="--hf-config-path.*llama-3.1-8b, qwen2.5-7b"):
        resolve_hf_config_path("llama-9")


def test_tiny_dummy_runner_bf16_is_seeded_and_finite():
    def runner(seed):
        cfg = EngineConfig(load_format="dummy", hf_config_path="tiny-llama", dtype="bfloat16",
                           kv_cache_memory=0.01, seed=seed, enforce_eager=True)  # fmt: skip
        return ModelRunner(cfg, progress=False)

    a, b = runner(1), runner(1)
    wa = a.model.layers[0].qkv_proj.method.weight
    assert wa.dtype == torch.bfloat16 and wa.device.type == "cpu"
    assert torch.equal(wa, b.model.layers[0].qkv_proj.method.weight)
    assert 0.015 < wa.float().std().item() < 0.025
    assert torch.equal(a.model.norm, torch.ones_like(a.model.norm))
    out = generate(a, [[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4,
                                                     ignore_eos=True))  # fmt: skip
    assert len(out[0]) == 4 and all(0 <= t < 1024 for t in out[0])
