"""Tensor-parallel helpers: shards, shape checks, partial weight reads, the dummy weights a
rank draws, and a collective that times out instead of hanging."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from model_runner.config import EngineConfig, EngineConfigError
from model_runner.gguf_loader import GGUFBlocks
from model_runner.linear_plan import LinearPlan
from model_runner.llama import LlamaForCausalLM, layer_weight_parts
from model_runner.loader import dummy_weights_by_name, init_dummy_weights, load_weights, take_part
from model_runner.model_source import ModelConfig
from model_runner.parallel import (
    RankPlacement,
    TensorParallel,
    TensorSlice,
    check_tensor_parallel_config,
    check_tensor_parallel_shape,
    rank_model_config,
)

CPU = torch.device("cpu")


def _config(heads=4, kv_heads=2, tied=False, bias=False) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=8, intermediate_size=48,
                       rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                       max_position_embeddings=128, tie_word_embeddings=tied,
                       eos_token_ids=(2,), bos_token_id=1, attention_bias=bias)  # fmt: skip


def _tp(rank: int, world: int) -> TensorParallel:
    return TensorParallel(RankPlacement(rank, world))


def test_kv_heads_split_or_replicated():
    assert [_tp(r, 2).kv_heads(4) for r in range(2)] == [(0, 2), (2, 4)]
    assert [_tp(r, 4).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [_tp(r, 2).kv_heads(1) for r in range(2)] == [(0, 1), (0, 1)]
    local = rank_model_config(_config(heads=8, kv_heads=2), _tp(3, 4))
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 12)


def test_shapes_that_do_not_divide_are_refused():
    nine = dataclasses.replace(_config(), num_heads=9, num_kv_heads=3, vocab_size=144)
    with pytest.raises(EngineConfigError, match="does not divide the model's 9 attention heads"):
        check_tensor_parallel_shape(nine, 2)
    check_tensor_parallel_shape(nine, 3)
    with pytest.raises(EngineConfigError, match="its 3 KV heads"):
        check_tensor_parallel_shape(dataclasses.replace(nine, num_heads=12), 4)
    check_tensor_parallel_shape(_config(heads=4, kv_heads=1), 4)  # replicated KV heads


def test_settings_tensor_parallelism_refuses(monkeypatch):
    check_tensor_parallel_config(EngineConfig(tensor_parallel_size=2), CPU)
    with pytest.raises(EngineConfigError, match="--enable-lora"):
        check_tensor_parallel_config(EngineConfig(tensor_parallel_size=2, enable_lora=True), CPU)
    with pytest.raises(EngineConfigError, match="--quantization int4"):
        check_tensor_parallel_config(EngineConfig(tensor_parallel_size=2, quantization="int4"), CPU)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EngineConfigError, match="needs 2 GPUs, 1 visible"):
        check_tensor_parallel_config(EngineConfig(tensor_parallel_size=2), torch.device("cuda"))


def test_parts_read_only_a_ranks_slice(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = torch.arange(48.0).reshape(6, 8)
    save_file({"w": full}, tmp_path / "w.safetensors")
    rows, cols = TensorSlice(0, 2, 4), TensorSlice(1, 4, 8)
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert torch.equal(take_part(f.get_slice("w"), rows), full[2:4])
        assert torch.equal(take_part(f.get_slice("w"), cols), full[:, 4:8])
        assert torch.equal(take_part(f.get_slice("w"), None), full)
    from gguf import GGMLQuantizationType, quantize

    weight = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    blocks = GGUFBlocks(GGMLQuantizationType.Q8_0, quantize(weight, GGMLQuantizationType.Q8_0))
    part = take_part(blocks, TensorSlice(0, 1, 3))
    assert isinstance(part, GGUFBlocks) and part.data.shape[0] == 2  # rows stay quantized
    np.testing.assert_array_equal(part.dequantize(), blocks.dequantize()[1:3])
    np.testing.assert_array_equal(
        take_part(blocks, TensorSlice(1, 32, 64)), blocks.dequantize()[:, 32:]
    )


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_dummy_weights_by_name_are_the_one_rank_weights(tied, bias):
    """A rank loads its parts of exactly the weights one rank draws from the same seed."""
    cfg = _config(tied=tied, bias=bias)
    plan = LinearPlan(torch.float32, CPU)
    one_rank = LlamaForCausalLM(cfg, plan, 128)
    init_dummy_weights(one_rank, seed=7, progress=False)
    rebuilt = LlamaForCausalLM(cfg, plan, 128)
    load_weights(rebuilt, dummy_weights_by_name(cfg, plan, 128, 7), 0, progress=False)
    for a, b in zip(one_rank.linears(), rebuilt.linears(), strict=True):
        assert torch.equal(a.method.weight, b.method.weight)
    for (name, a), (_, b) in zip(
        one_rank.named_parameters(), rebuilt.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_rank_parts_of_a_layer():
    parts = layer_weight_parts(_config(heads=4, kv_heads=1), _tp(1, 2))
    assert parts["self_attn.q_proj"] == TensorSlice(0, 16, 32)
    assert parts["self_attn.k_proj"] == TensorSlice(0, 0, 8)  # the one KV head, replicated
    assert parts["self_attn.o_proj"] == TensorSlice(1, 16, 32)
    assert parts["mlp.down_proj"] == TensorSlice(1, 24, 48)
    assert layer_weight_parts(_config(), _tp(0, 1)) == {}


RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from model_runner.parallel import RankPlacement, init_tensor_parallel
    rank, run_dir = int(sys.argv[1]), sys.argv[2]
    tp = init_tensor_parallel(RankPlacement(rank, 2, run_dir), torch.device("cpu"), 2.0)
    x = torch.full((4,), float(rank + 1))
    tp.all_reduce(x)
    assert x.tolist() == [3.0] * 4, x
    if rank == 1:
        time.sleep(30)  # never meets rank 0's second collective
    else:
        started = time.monotonic()
        try:
            tp.all_reduce(x)
        except Exception as e:
            print(f"timed out after {time.monotonic() - started:.1f} s: {e}", flush=True)
        os._exit(0)  # NOTE: gloo's teardown after a timed-out op may abort the process
    """
)


def test_a_collective_times_out_instead_of_hanging(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    started = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
    assert procs[0].returncode == 0, err
    assert "timed out after" in out and "Timed out" in out, (out, err)
    assert float(out.split()[3]) < 10 and time.monotonic() - started < 60


class _SumLater:
    """A stand-in for two ranks in one process: the test adds the ranks' parts itself."""

    @staticmethod
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return x


def test_sharded_refinement_adds_up_to_the_full_one():
    from model_runner.llama import refine_top_logits, refine_top_logits_sharded

    torch.manual_seed(0)
    weight = torch.randn(64, 16)
    hidden = torch.randn(3, 16)
    logits = (hidden @ weight.t()).bfloat16().float()  # rounded, as bf16 logits are
    full = refine_top_logits(logits.clone(), hidden, weight)
    top = logits.topk(8, dim=-1).indices
    parts = [
        refine_top_logits_sharded(logits.clone(), hidden, weight[s : s + 32], s, _SumLater)
        for s in (0, 32)
    ]
    summed = parts[0].gather(1, top) + parts[1].gather(1, top)
    torch.testing.assert_close(summed, full.gather(1, top), rtol=0, atol=1e-5)
    assert not torch.equal(full.gather(1, top), logits.gather(1, top))  # it did refine
