"""Triton rotary embedding vs the torch reference; the Llama 3 scaled cache vs Meta's formula."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rotary import build_cos_sin_cache, rope_inv_freq, rotary_embedding_ref
from kernels.rotary_triton import rotary_embedding_triton
from tests.kernels.helpers import assert_close, poison_like, randn

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _meta_llama3_scaling(freqs: list[float]) -> list[float]:
    """`apply_scaling` of Meta's llama-models reference code, kept in its loop form."""
    factor, low, high, old_len = 8.0, 1.0, 4.0, 8192
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def test_llama3_inv_freq_matches_meta_formula():
    base, dim = 500000.0, 128
    plain = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
    want = torch.tensor(_meta_llama3_scaling(plain), dtype=torch.float64)
    got = rope_inv_freq(dim, base, LLAMA3_SCALING).double()
    assert torch.allclose(got, want.float().double(), rtol=1e-6, atol=0)
    assert (got < torch.tensor(plain)).any() and (got == torch.tensor(plain).float()).any()


def _check(*, is_neox, dtype, device, rot_dim, head_dim, scaling=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = build_cos_sin_cache(rot_dim, 4096, 10000.0, scaling).to(device)
    num_tokens = 13
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    query = randn(num_tokens, 6, head_dim, dtype=dtype, device=device, gen=gen)
    key = randn(num_tokens, 2, head_dim, dtype=dtype, device=device, gen=gen)
    out = (poison_like(query), poison_like(key))
    q, k = rotary_embedding_triton(positions, query, key, cache, is_neox, out=out)
    assert q is out[0] and k is out[1]
    q_want, k_want = rotary_embedding_ref(positions, query, key, cache, is_neox)
    assert_close(q, q_want, dtype)
    assert_close(k, k_want, dtype)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_matches_reference(is_neox, dtype, head_dim, device):
    _check(is_neox=is_neox, dtype=dtype, device=device, rot_dim=head_dim, head_dim=head_dim)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_partial_rot_dim(is_neox, device):
    _check(is_neox=is_neox, dtype=torch.float32, device=device, rot_dim=32, head_dim=96, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_llama3_scaled_cache(dtype, device):
    _check(
        is_neox=True, dtype=dtype, device=device, rot_dim=128, head_dim=128,
        scaling=LLAMA3_SCALING, seed=5,
    )  # fmt: skip


def test_rotary_in_place_on_fused_qkv_views(device):
    gen = torch.Generator().manual_seed(6)
    cache = build_cos_sin_cache(64, 512, 10000.0)
    qkv = randn(5, (4 + 2 + 2) * 64, dtype=torch.float32, device=device, gen=gen)
    query, key = qkv[:, : 4 * 64].view(5, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
    positions = torch.tensor([0, 7, 8, 300, 511]).to(device)
    q_want, k_want = rotary_embedding_ref(positions, query, key, cache.to(device))
    rotary_embedding_triton(positions, query, key, cache.to(device), out=(query, key))
    assert_close(query, q_want, torch.float32)
    assert_close(key, k_want, torch.float32)
