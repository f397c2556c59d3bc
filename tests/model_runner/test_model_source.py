"""Resolving models, reading configs, the GGUF tokenizer cache, KV-cache sizing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_runner.config import EngineConfig, resolve_dtype, resolve_max_model_len
from model_runner.gguf_loader import hf_name, unpermute_rotary
from model_runner.kv_cache import KVCache, bytes_per_block, num_blocks_for_cpu
from model_runner.model_source import (
    DEFAULT_MODEL_NAME,
    ModelSourceError,
    _tokenizer_cache_dir,
    load_tokenizer,
    model_config_from_hf,
    resolve_model,
)
from tests.model_runner.conftest import RUNNER_KV_GIB


def test_default_model_resolves_to_the_embedded_gguf(gguf_path):
    source = resolve_model(EngineConfig())
    assert source.format == "gguf" and source.path == gguf_path
    assert source.name == DEFAULT_MODEL_NAME
    assert resolve_model(EngineConfig(served_model_name="smol")).name == "smol"
    assert resolve_model(EngineConfig(model=str(gguf_path))).format == "gguf"


def test_bad_model_arguments_raise(tmp_path, gguf_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(EngineConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve_model(EngineConfig(model=str(tmp_path)))
    with pytest.raises(ModelSourceError, match="GGUF"):
        resolve_model(EngineConfig(model=str(gguf_path), load_format="safetensors"))
    with pytest.raises(ModelSourceError, match="load_format"):
        resolve_model(EngineConfig(load_format="pickle"))


def test_dummy_takes_config_from_hf_config_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source = resolve_model(EngineConfig(load_format="dummy", hf_config_path=str(tmp_path)))
    assert source.format == "dummy" and source.config_path == tmp_path / "config.json"


def test_gguf_model_config(runner):
    mc = runner.model_config
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads) == (576, 30, 9, 3)
    assert (mc.head_dim, mc.intermediate_size, mc.vocab_size) == (64, 1536, 49152)
    assert mc.rope_theta == 100000.0 and mc.rms_norm_eps == pytest.approx(1e-5)
    assert mc.tie_word_embeddings and mc.eos_token_ids == (2,) and mc.bos_token_id == 1
    assert runner.eos_token_ids == [2] and runner.vocab_size == 49152
    assert runner.max_model_len == 2048


def test_hf_config_reads_qwen2_bias_and_generation_eos(tmp_path):
    cfg = {
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
        "eos_token_id": 5, "sliding_window": 16, "use_sliding_window": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    mc = model_config_from_hf(tmp_path / "config.json")
    assert mc.attention_bias and mc.head_dim == 8 and mc.eos_token_ids == (5, 7)
    assert mc.sliding_window is None and not mc.tie_word_embeddings


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    w = np.random.default_rng(0).standard_normal((3 * 64, 10)).astype(np.float32)
    assert np.array_equal(unpermute_rotary(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_gguf_names_map_to_hf_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_up.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("blk.1.attn_k.bias") == "model.layers.1.self_attn.k_proj.bias"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_gguf_tokenizer_is_cached(gguf_path, hf_tokenizer):
    source = resolve_model(EngineConfig())
    first = load_tokenizer(source)
    cache_dir = _tokenizer_cache_dir(gguf_path)
    assert (cache_dir / "tokenizer_config.json").is_file()
    cached = load_tokenizer(source)
    assert cached.name_or_path == str(cache_dir)  # read back, not converted again (~5 s)
    text = "Hello, world! <|im_start|>user\nÇa va? 12345"
    expected = hf_tokenizer(text)["input_ids"]
    assert first(text)["input_ids"] == expected and cached(text)["input_ids"] == expected
    assert cached.eos_token_id == 2 and cached.chat_template == hf_tokenizer.chat_template


def test_kv_cache_sizing(runner):
    mc = runner.model_config
    per_block = bytes_per_block(mc, 16, torch.float32)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert num_blocks_for_cpu(EngineConfig(), mc, torch.float32, 8192) == (2 << 30) // per_block
    assert num_blocks_for_cpu(EngineConfig(), mc, torch.bfloat16, 8192) == (2 << 30) // (
        per_block // 2
    )
    capped = EngineConfig(max_num_seqs=2, kv_cache_memory=1.0)
    assert num_blocks_for_cpu(capped, mc, torch.float32, 100) == 2 * 7
    with pytest.raises(ValueError):
        num_blocks_for_cpu(EngineConfig(kv_cache_memory=1e-6), mc, torch.float32, 100)
    assert runner.num_blocks == int(RUNNER_KV_GIB * (1 << 30)) // per_block


def test_kv_cache_block_copy(runner):
    cache = KVCache(runner.model_config, 4, 2, torch.float32, torch.device("cpu"))
    cache.storage.normal_()
    before = cache.storage.clone()
    cache.copy_blocks([(0, 3), (1, 2)])
    assert cache.dummy_block == 4
    for k, _v in cache.layers:
        assert k.shape == (5, 2, 3, 64)  # the 4 blocks, then the reserved dummy block
    assert torch.equal(cache.storage[:, :, 3], before[:, :, 0])
    assert torch.equal(cache.storage[:, :, 2], before[:, :, 1])
    assert torch.equal(cache.storage[:, :, :2], before[:, :, :2])


def test_config_helpers():
    assert resolve_dtype(EngineConfig(device="cpu", dtype="float32")) == torch.float32
    assert resolve_dtype(EngineConfig(dtype="bfloat16")) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype(EngineConfig(dtype="int3"))
    assert resolve_max_model_len(EngineConfig(), 131072) == 8192
    assert resolve_max_model_len(EngineConfig(max_model_len=100), 2048) == 100
    with pytest.raises(ValueError):
        resolve_max_model_len(EngineConfig(max_model_len=4096), 2048)
