"""The selection layer: references on the CPU, Triton on CUDA, TOKENMILL_KERNELS forces either."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kernels.activation_triton
from kernels import ops
from kernels.layernorm import fused_add_rms_norm_ref
from kernels.rotary import build_cos_sin_cache
from tests.kernels.helpers import assert_close, make_paged_batch, randn


@pytest.mark.parametrize(
    "env,cpu,cuda", [(None, False, True), ("torch", False, False), ("triton", True, True)]
)
def test_use_triton(env, cpu, cuda, monkeypatch):
    if env is not None:
        monkeypatch.setenv("TOKENMILL_KERNELS", env)
    assert ops.use_triton(torch.empty(1)) is cpu
    assert ops.use_triton(SimpleNamespace(is_cuda=True)) is cuda


@pytest.mark.parametrize("env,want_triton", [(None, False), ("torch", False), ("triton", True)])
def test_dispatch_picks_the_implementation(env, want_triton, monkeypatch):
    if env is not None:
        monkeypatch.setenv("TOKENMILL_KERNELS", env)
    calls = []
    real = kernels.activation_triton.silu_and_mul_triton

    def spy(x, out=None):
        calls.append(x)
        return real(x, out)

    monkeypatch.setattr(kernels.activation_triton, "silu_and_mul_triton", spy)
    x = randn(3, 64, dtype=torch.float32, device="cpu", gen=torch.Generator().manual_seed(0))
    ops.silu_and_mul(x)
    assert bool(calls) is want_triton


def test_forced_triton_layer_matches_torch(monkeypatch, device):
    """One attention layer's ops end to end through `kernels.ops`, Triton vs references."""
    gen = torch.Generator().manual_seed(9)
    batch = make_paged_batch(
        (1, 12), (20, 3), num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32, device=device, seed=9,
    )  # fmt: skip
    hidden = randn(13, 256, dtype=torch.float32, device=device, gen=gen)
    residual = randn(13, 256, dtype=torch.float32, device=device, gen=gen)
    weight = randn(256, dtype=torch.float32, device=device, gen=gen)
    key = randn(13, 2, 64, dtype=torch.float32, device=device, gen=gen)
    positions = torch.tensor([20, *range(3, 15)], device=device)
    slots = batch.block_tables.long()[[0] + [1] * 12, positions // 16] * 16 + positions % 16
    cache = build_cos_sin_cache(64, 64, 10000.0).to(device)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("TOKENMILL_KERNELS", mode)
        k_cache, v_cache = batch.clean_key_cache.clone(), batch.clean_value_cache.clone()
        normed, summed = ops.fused_add_rms_norm(hidden, residual, weight, 1e-5)
        q, k = ops.rotary_embedding(positions, batch.query, key, cache)
        ops.write_kv(k, k, k_cache, v_cache, slots)
        attn = ops.paged_attention(
            q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.125
        )
        mlp = ops.silu_and_mul(ops.rms_norm(summed, weight, 1e-5))
        results[mode] = (normed, summed, q, k, k_cache, attn, mlp)
    for got, want in zip(results["triton"], results["torch"], strict=True):
        assert_close(got, want, torch.float32)
    assert_close(results["triton"][0], fused_add_rms_norm_ref(hidden, residual, weight, 1e-5)[0],
                 torch.float32)  # fmt: skip
