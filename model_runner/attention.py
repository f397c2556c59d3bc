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
    # Batch-invariant steps: one attention call per sequence (`per_sequence_views`).
    per_sequence: list[SequenceView] | None = None


@dataclass(frozen=True, slots=True)
class SequenceView:
    """One sequence of the step as an attention batch of its own."""

    rows: slice  # its query rows in the flat batch
    block_table: torch.Tensor  # [1, its blocks] int32
    seq_len: torch.Tensor  # [1] int32
    query_start_loc: torch.Tensor  # [2] int32
    max_seq_len: int


def per_sequence_views(
    tables: list[list[int]], seq_lens: list[int], query_start_loc: list[int], device
) -> list[SequenceView]:
    """Per-sequence attention inputs, built once per step (not once per layer)."""
    views = []
    for i, (table, n) in enumerate(zip(tables, seq_lens, strict=True)):
        a, b = query_start_loc[i], query_start_loc[i + 1]
        views.append(
            SequenceView(
                rows=slice(a, b),
                block_table=torch.tensor([table], dtype=torch.int32, device=device),
                seq_len=torch.tensor([n], dtype=torch.int32, device=device),
                query_start_loc=torch.tensor([0, b - a], dtype=torch.int32, device=device),
                max_seq_len=n,
            )
        )
    return views


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    layer: int = 0,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Write the new K/V [T, KH, D] into layer `layer`'s cache, then attend: [T, H, D].
    `kv_scales`: (k_scale, v_scale) of an FP8 cache (`kernels.kv_cache`)."""
    key_cache, value_cache = kv_cache
    k_scale, v_scale = kv_scales
    ops.write_kv(key, value, key_cache, value_cache, meta.slot_mapping, meta.all_slots_valid,
                 k_scale, v_scale)  # fmt: skip
    if (ctx := meta.decode_context) is not None:
        return ctx.attend(ctx.buffers[layer], query, key, value, kv_cache, scale)
    if meta.per_sequence is not None:
        # NOTE: each sequence's attention then has the shapes it would have alone, so its
        # result does not depend on what else runs in the step (kernels block by shape).
        return torch.cat(
            [
                ops.paged_attention(
                    query[v.rows],
                    key_cache,
                    value_cache,
                    v.block_table,
                    v.seq_len,
                    v.query_start_loc,
                    scale,
                    max_query_len=v.rows.stop - v.rows.start,
                    max_seq_len=v.max_seq_len,
                    sliding_window=sliding_window,
                    k_scale=k_scale,
                    v_scale=v_scale,
                )  # fmt: skip
                for v in meta.per_sequence
            ]
        )
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
        k_scale=k_scale,
        v_scale=v_scale,
    )
