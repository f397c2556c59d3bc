"""Unified paged attention over a mixed batch of prefill chunks and decodes.

Batch layout (DESIGN.md): the query tokens of all sequences are flattened into one
`[num_tokens, num_heads, head_dim]` tensor; sequence `i` owns rows
`query_start_loc[i]:query_start_loc[i + 1]`, which are the *last* tokens of its context of
`seq_lens[i]` tokens. Their K/V must already be in the paged cache (write them with
`write_kv` first). Query token `j` of a chunk sits at position `seq_len - query_len + j` and
attends causally to every cached position `<= ` its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kv_cache import KV_FP8, from_cache_dtype, indexable


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Torch reference: gather each sequence's blocks, pad, masked attention, un-pad.

    query: [num_tokens, num_heads, head_dim]; key_cache/value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks]
    int32; seq_lens: [num_seqs] int32; query_start_loc: [num_seqs + 1] int32.
    `max_query_len`/`max_seq_len` are host-side bounds that spare a device sync.
    `k_scale`/`v_scale`: an FP8 cache's per-tensor scales (`kernels.kv_cache`; other
    dtypes ignore them). Returns [num_tokens, num_heads, head_dim] in query's dtype.
    """
    if key_cache.dtype != KV_FP8:
        k_scale = v_scale = 1.0
    # NOTE: q . (k * k_scale) = (q . k) * k_scale and p @ (v * v_scale) = (p @ v) * v_scale
    out = _gathered_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        scale * k_scale, max_query_len, max_seq_len, sliding_window, soft_cap,
    )  # fmt: skip
    return out if v_scale == 1.0 else out.mul_(v_scale)


def _gathered_attention(
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
    max_query_len, max_seq_len, sliding_window, soft_cap,
) -> torch.Tensor:  # fmt: skip
    """`paged_attention_ref` of unit K/V scales."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    num_ctx_blocks = -(-max_seq_len // block_size)
    ctx_len = num_ctx_blocks * block_size

    # NOTE: index_select over whole blocks is a plain row copy, faster than fancy indexing.
    flat_tables = block_tables[:, :num_ctx_blocks].reshape(-1).long()
    keys, values = (
        from_cache_dtype(indexable(cache).index_select(0, flat_tables), query.dtype, cache.dtype)
        .view(num_seqs, ctx_len, num_kv_heads, head_dim)
        for cache in (key_cache, value_cache)
    )  # fmt: skip
    if max_query_len == 1 and num_tokens == num_seqs and soft_cap is None:
        visible = decode_visible_mask(seq_lens, ctx_len, sliding_window)
        return decode_attention(query, keys, values, visible, scale)

    return _chunked_attention(
        query,
        keys,
        values,
        seq_lens,
        query_start_loc,
        max_query_len,
        scale,
        sliding_window,
        soft_cap,
    )


def _chunked_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    """Query chunks of any length: pad them into a grid, causal masked attention, un-pad.

    keys/values: [seqs, ctx, kv_heads, dim], the gathered context of each sequence.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, ctx_len, num_kv_heads = keys.shape[:3]
    device = query.device
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    token_idx = torch.arange(num_tokens, device=device)
    seq_of_token = torch.searchsorted(query_start_loc[1:].long(), token_idx, right=True)
    row_of_token = token_idx - query_start_loc[seq_of_token].long()
    q_grid = query.new_zeros(num_seqs, max_query_len, num_heads, head_dim)
    q_grid[seq_of_token, row_of_token] = query

    # NOTE: padded query rows sit past the context end, so they still see >= 1 key: no NaN.
    q_pos = (seq_lens - query_lens).long()[:, None] + torch.arange(max_query_len, device=device)
    k_pos = torch.arange(ctx_len, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < seq_lens.long()[:, None, None]
    )
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window

    q = q_grid.transpose(1, 2)  # [seqs, heads, q, dim]
    k = keys.transpose(1, 2)  # [seqs, kv_heads, ctx, dim]
    v = values.transpose(1, 2)
    out = _masked_attention(q, k, v, mask[:, None], scale, soft_cap)
    return out.transpose(1, 2)[seq_of_token, row_of_token]


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """SDPA with GQA, or explicit fp32 scores when a logits soft-cap applies."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if soft_cap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
        )
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = soft_cap * torch.tanh(scores / soft_cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def decode_visible_mask(
    seq_lens: torch.Tensor, ctx_len: int, sliding_window: int | None, before_new: bool = False
) -> torch.Tensor:
    """[seqs, 1, 1, ctx_len] bool: which context positions the one new token attends to.

    `before_new`: the columns hold the context before the new token (its own position
    excluded), for attention with the new token's K/V appended after them.
    """
    k_pos = torch.arange(ctx_len, device=seq_lens.device)
    lens = seq_lens.long()[:, None]
    visible = k_pos[None, :] < (lens - 1 if before_new else lens)
    if sliding_window is not None:
        visible &= (lens - 1) - k_pos[None, :] < sliding_window
    return visible[:, None, None, :]


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over each sequence's contiguous context.

    query: [seqs, heads, dim]; keys/values: [seqs, ctx, kv_heads, dim], any row stride;
    visible: `decode_visible_mask` (None: every position). NOTE: a KV head's query heads
    are adjacent (head // group), so folding the group into SDPA's query length gives GQA with no
    repeat; SDPA reads the `[seqs, kv_heads, ctx, dim]` transposed view in place (no
    head-major copy). 2-4x faster on the CPU than per-head matmuls, bf16 above all.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    out = F.scaled_dot_product_attention(
        query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible,
        scale=scale,
    )
    return out.reshape(num_seqs, num_heads, head_dim)
