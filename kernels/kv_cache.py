"""Writing new keys and values into the paged KV cache."""

from __future__ import annotations

import torch


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] in place at `slot_mapping`.

    A slot is `block_id * block_size + offset`; negative slots (padding) are skipped.
    key_cache/value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    `all_valid`: the caller knows that no slot is negative (else: look).
    """
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    valid = None if all_valid else slot_mapping >= 0
    if valid is None or bool(valid.all()):  # the usual case: one row copy per token
        slots = slot_mapping.long()
        flat_k.index_copy_(0, slots, key.to(key_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(value_cache.dtype))
        return
    slots = slot_mapping[valid].long()
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)
