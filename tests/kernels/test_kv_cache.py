"""Triton KV write vs the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import write_kv_ref
from kernels.kv_cache_triton import write_kv_triton
from tests.kernels.helpers import randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 128, 32)])
def test_write_kv_matches_reference(dtype, num_kv_heads, head_dim, block_size, device):
    gen = torch.Generator().manual_seed(num_kv_heads + head_dim)
    num_blocks, num_tokens = 6, 11
    key = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    value = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # an empty (padding) slot: skipped
    slots[7] = -1
    slot_mapping = slots.to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = randn(*shape, dtype=dtype, device=device, gen=gen)
    v_cache = randn(*shape, dtype=dtype, device=device, gen=gen)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    write_kv_ref(key, value, k_want, v_want, slot_mapping)
    write_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    # The written slots really changed, and the empty slot's token went nowhere.
    flat = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[0]], key[0])
    assert not any(torch.equal(flat[s], key[3]) for s in range(flat.shape[0]))


def test_write_kv_strided_views_of_fused_qkv(device):
    """key/value as views into a fused qkv output; the cache is NaN-poisoned around them."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, heads, kv_heads, head_dim, block_size = 5, 4, 2, 64, 16
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.float32,
                device=device, gen=gen)  # fmt: skip
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(-1, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(-1, kv_heads, head_dim)
    slot_mapping = torch.tensor([17, 3, -1, 40, 18], device=device)
    k_cache = torch.full((4, block_size, kv_heads, head_dim), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    write_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    for t, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[s], key[t])
            assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[s], value[t])
    assert int(torch.isfinite(k_cache).sum()) == 4 * kv_heads * head_dim
