"""Tiny random HF models saved as safetensors folders: Llama, Qwen2 (qkv bias), Mistral
(sliding window). Our logits and greedy tokens must match HF; `dummy` loads from a config."""

from __future__ import annotations

import pytest
import torch

from model_runner.config import EngineConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from tests.model_runner.driver import generate

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,
    rms_norm_eps=1e-6,
    eos_token_id=None,
    bos_token_id=None,
)


def _tiny_hf(kind: str):
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[kind])
    if kind == "llama":
        config = transformers.LlamaConfig(**COMMON, rope_theta=500.0, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
        return model
    config = transformers.MistralConfig(**COMMON, sliding_window=8, head_dim=16)
    return transformers.MistralForCausalLM(config)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny(request, tmp_path_factory):
    model = _tiny_hf(request.param).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    config = EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=0.001)
    runner = ModelRunner(config, progress=False)
    return request.param, model, runner, folder


PROMPTS = [
    [5, 17, 99, 3, 42, 8, 64, 1, 2, 77, 31, 90, 12, 6, 50, 23, 14, 120, 9, 33],
    [7, 7, 7],
    [100],
]


def test_prefill_logits_match_hf(tiny):
    kind, model, runner, _ = tiny
    from model_runner.attention import AttentionMetadata

    ids = PROMPTS[0]
    n = len(ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(runner.num_blocks, dtype=torch.int32)[None, : -(-n // 16)],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.inference_mode():
        ours = runner.model(
            torch.tensor(ids), torch.arange(n), runner.kv_cache.layers, meta, torch.arange(n)
        )
        ref = model(torch.tensor([ids])).logits[0]
    assert ref.std() > 0.5  # logits well spread, so greedy comparisons are meaningful
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_matches_hf_with_chunked_prefill(tiny):
    kind, model, runner, _ = tiny
    expected = []
    for ids in PROMPTS:
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected.append(gen[0, len(ids) :].tolist())
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert generate(runner, PROMPTS, params) == expected
    assert generate(runner, PROMPTS, params, chunk_size=5, token_budget=9) == expected
    if kind == "mistral":  # 20 + 24 tokens with an 8-token window: the window matters
        assert runner.model_config.sliding_window == 8


def test_dummy_weights_are_seeded(tmp_path):
    import transformers

    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    runners = []
    for seed in (3, 3, 4):
        config = EngineConfig(
            load_format="dummy",
            hf_config_path=str(tmp_path),
            seed=seed,
            dtype="float32",
            kv_cache_memory=0.001,
        )
        runners.append(ModelRunner(config, progress=False))
    a, b, c = (_weights(r.model) for r in runners)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.qkv_proj"], c["layers.0.qkv_proj"])
    assert torch.equal(a["norm"], torch.ones(64))
    assert runners[0].model_config.vocab_size == 128
    assert len(generate(runners[0], PROMPTS[:1], params)[0]) == 6


def _weights(model) -> dict[str, torch.Tensor]:
    """Parameters and every dense projection's weight, by name."""
    out = dict(model.named_parameters())
    for name, module in model.named_modules():
        if hasattr(module, "method"):
            out[name] = module.method.weight
    return out


def test_cpu_float32_linear_weights_are_stored_transposed(tmp_path):
    import transformers

    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    config = EngineConfig(
        load_format="dummy", hf_config_path=str(tmp_path), dtype="float32", kv_cache_memory=0.001
    )
    model = ModelRunner(config, progress=False).model
    layer = model.layers[0]
    for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
        weight = linear.method.weight
        assert weight.t().is_contiguous() and not weight.is_contiguous()
    assert model.lm_head.method.weight.t().is_contiguous()
    down = layer.down_proj.method.weight
    x = torch.randn(32, down.shape[1])
    expected = x @ down.contiguous().t()
    assert torch.allclose(layer.down_proj(x), expected, atol=1e-5)
