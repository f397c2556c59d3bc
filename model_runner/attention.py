"""The per-step attention metadata of the flattened batch, and the paged attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import ops
from model_runner.decode_context import DecodeContextStep


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Batch layout of one step (DESIGN.md): S sequences, T tokens, no padding.

    Sequence i owns token rows query_start_loc[i]:query_start_loc[i + 1], the last tokens
    of its context of seq_lens[i] tokens; slot_mapping[t] is where token t's K/V go.
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int
    max_seq_len: int
    all_slots_valid: bool = False  # no padding slot (< 0) in slot_mapping
    # CPU decode steps: attend over the contiguous copy of the batch's K/V instead.
    decode_context: DecodeContextStep | None = None


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Write the new K/V [T, KH, D] into `layer`'s cache, then attend: [T, H, D]."""
    key_cache, value_cache = kv_cache
    ops.write_kv(key, value, key_cache, value_cache, meta.slot_mapping, meta.all_slots_valid)
    if meta.decode_context is not None:
        return meta.decode_context.attend(layer, query, key, value, kv_cache, scale, sliding_window)
    return ops.paged_attention(
        query,
        key_cache,
        value_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        sliding_window=sliding_window,
    )
