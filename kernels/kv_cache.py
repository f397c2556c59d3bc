"""Writing new keys and values into the paged KV cache.

An FP8 cache (`--kv-cache-dtype fp8`: float8_e4m3fn) stores key / k_scale and
value / v_scale, one float per layer each (per-tensor scales); readers multiply back.
NOTE: torch's CPU indexing ops have no FP8 kernels, so FP8 caches move as uint8 views.
"""

from __future__ import annotations

import torch

KV_FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(KV_FP8).max


def indexable(cache: torch.Tensor) -> torch.Tensor:
    """The cache as a tensor the CPU's index ops take (FP8 as its uint8 bits)."""
    return cache.view(torch.uint8) if cache.dtype == KV_FP8 else cache


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """New K or V in the cache's dtype (FP8: x / scale, saturated, as uint8 bits)."""
    if dtype != KV_FP8:
        return x.to(dtype)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(KV_FP8).view(torch.uint8)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, cache_dtype: torch.dtype):
    """Gathered cache rows (FP8 as uint8 bits) in `dtype`, not yet multiplied by the scale."""
    return x.view(KV_FP8).to(dtype) if cache_dtype == KV_FP8 else x


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] in place at `slot_mapping`.

    A slot is `block_id * block_size + offset`; negative slots (padding) are skipped.
    key_cache/value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    `all_valid`: the caller knows that no slot is negative (else: look). `k_scale` and
    `v_scale`: an FP8 cache's per-tensor scales (ignored by other dtypes).
    """
    flat_k = indexable(key_cache).view(-1, *key_cache.shape[2:])
    flat_v = indexable(value_cache).view(-1, *value_cache.shape[2:])
    key = to_cache_dtype(key, key_cache.dtype, k_scale)
    value = to_cache_dtype(value, value_cache.dtype, v_scale)
    valid = None if all_valid else slot_mapping >= 0
    if valid is None or bool(valid.all()):  # the usual case: one row copy per token
        slots = slot_mapping.long()
        flat_k.index_copy_(0, slots, key)
        flat_v.index_copy_(0, slots, value)
        return
    slots = slot_mapping[valid].long()
    flat_k[slots] = key[valid]
    flat_v[slots] = value[valid]
