"""Triton unified paged attention: one kernel for a mixed batch of prefill chunks and decodes.

Same contract as `kernels.paged_attention.paged_attention_ref`. Each program owns one tile of
`BLOCK_M` query rows of one sequence and one KV head: `BLOCK_Q` query tokens times the
`GROUP` query heads that share that KV head (GQA), so each K/V tile is loaded once per KV
head. It walks the sequence's KV blocks in tiles of `TILE_N` keys through the block table
with an fp32 online softmax (base 2), `tl.dot` for QK^T and PV, and no masking on the tiles
that every row sees in full.

Sequences are split in two classes, each with its own tile shape: short query chunks
(decodes, `query_len <= BLOCK_Q` of the decode config) get 16-row tiles, longer chunks
(prefill) get 128-row tiles. A mixed batch is two launches over the same batch; a program
whose sequence belongs to the other class exits at once.

Split-KV (flash decoding): with `num_splits > 1` each program handles one slice of the KV
tiles and writes an unnormalised partial result plus its running max and sum; a reduction
kernel merges the slices. It is chosen automatically on CUDA for decode-only batches whose
`num_seqs * num_kv_heads` programs are fewer than 2 per SM (e.g. batch 1-32 of Llama-3-8B
at >= 512 tokens), and can be forced (any batch) with `num_kv_splits`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32
_MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest sequence index whose first q-block (`qsl[i] // BLOCK_Q + i`) is <= q_block_idx."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # NOTE: the CPU interpreter multiplies bf16 as raw uint16 bits; upcast there (exact).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, tile, q_pos, seq_len, kv_head, d, d_valid,
    k_cache_ptr, v_cache_ptr, table_ptr, s_mul, cap_mul, sliding_window,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over keys [tile * TILE_N, (tile + 1) * TILE_N)."""
    keys = tile * TILE_N + tl.arange(0, TILE_N)
    key_valid = keys < seq_len
    if MASKED:
        blk = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0)
    else:
        blk = tl.load(table_ptr + keys // BLOCK_SIZE)
    blk = blk.to(tl.int64)
    slot_k = blk * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
    slot_v = blk * stride_vb + (keys % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
    # NOTE: slots past seq_len hold stale data (maybe NaN): masked tiles never load them.
    k_mask = d_valid[:, None]
    v_mask = d_valid[None, :]
    if MASKED:
        k_mask = k_mask & key_valid[None, :]
        v_mask = v_mask & key_valid[:, None]
    # NOTE: an FP8 cache upcasts here; its K scale is in s_mul, its V scale applied after.
    k = tl.load(k_cache_ptr + slot_k[None, :] + d[:, None], mask=k_mask, other=0.0).to(q.dtype)
    s = _dot(q, k, None, DOT_PRECISION, UPCAST)
    if USE_SOFT_CAP:
        s = cap_mul * _tanh(s * s_mul)
    else:
        s = s * s_mul
    if MASKED:
        allowed = (keys[None, :] <= q_pos[:, None]) & key_valid[None, :]
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - keys[None, :] < sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # NOTE: a row that has seen no visible key keeps m = -inf; subtract 0 instead (no NaN).
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + slot_v[:, None] + d[None, :], mask=v_mask, other=0.0).to(q.dtype)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _tile_range(
    first_pos, seq_len, sliding_window, split, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr,
):  # fmt: skip
    """KV tiles [lo, hi) one q-block of this split visits; [lo, mid) need no causal mask."""
    last_pos = tl.minimum(seq_len, first_pos + BLOCK_Q) - 1
    tile_lo = 0
    if USE_WINDOW:
        tile_lo = tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N
    tile_hi = tl.cdiv(last_pos + 1, TILE_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tl.minimum(tile_lo + split * per_split, tile_hi)
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)
    # NOTE: tiles below (first_pos + 1) // TILE_N are causally visible to every row in full.
    tile_mid = tile_lo
    if not USE_WINDOW:
        tile_mid = tl.maximum(tl.minimum((first_pos + 1) // TILE_N, tile_hi), tile_lo)
    return tile_lo, tile_mid, tile_hi


@triton.jit
def _store_result(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, m_i, l_i, acc, token, head, d, row_valid,
    io_mask, split, num_heads, stride_ot, stride_oh, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """The normalised output, or (split-KV) the unnormalised partial with its max and sum."""
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = token[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_ptr + o_offs + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=io_mask)


@triton.jit
def _paged_attention_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    s_mul, cap_mul, sliding_window, num_seqs, num_heads, q_len_lo, q_len_hi,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    q_block_global = tl.program_id(0)
    kv_head, split = tl.program_id(1), tl.program_id(2)
    seq = _find_seq_idx(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if (q_len <= q_len_lo) | (q_len > q_len_hi) | (q_block * BLOCK_Q >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = ctx_len + tok
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q_offs = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    io_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + q_offs + d[None, :], mask=io_mask, other=0.0)

    tile_lo, tile_mid, tile_hi = _tile_range(
        ctx_len + q_block * BLOCK_Q, seq_len, sliding_window, split,
        BLOCK_Q, TILE_N, NUM_SPLITS, USE_WINDOW,
    )  # fmt: skip

    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_mid):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tile, q_pos, seq_len, kv_head, d, d_valid,
            k_cache_ptr, v_cache_ptr, table_ptr, s_mul, cap_mul, sliding_window,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, TILE_N, False, USE_WINDOW, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    for tile in range(tile_mid, tile_hi):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tile, q_pos, seq_len, kv_head, d, d_valid,
            k_cache_ptr, v_cache_ptr, table_ptr, s_mul, cap_mul, sliding_window,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, TILE_N, True, USE_WINDOW, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    _store_result(
        out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, m_i, l_i, acc, (q_start + tok).to(tl.int64),
        head, d, row_valid, io_mask, split, num_heads, stride_ot, stride_oh, HEAD_DIM_PAD,
        NUM_SPLITS,
    )  # fmt: skip


@triton.jit
def _reduce_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_heads, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Merge the per-split partial softmax results of one token and one KV head's group."""
    token = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)[:, None]
    head = tl.program_id(1) * GROUP + g
    s = tl.arange(0, SPLITS_PAD)[None, :]
    valid = (g < GROUP) & (s < NUM_SPLITS)
    part = (token * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_m_ptr + part, mask=valid, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=valid, other=0.0)
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_max[:, None])
    l_tot = tl.sum(w * l_s, 1)
    d = tl.arange(0, HEAD_DIM_PAD)[None, None, :]
    acc_mask = valid[:, :, None] & (d < HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM_PAD + d, mask=acc_mask, other=0.0)
    out = tl.sum(acc * w[:, :, None], 1) / tl.where(l_tot > 0.0, l_tot, 1.0)[:, None]
    d2 = tl.arange(0, HEAD_DIM_PAD)[None, :]
    o_offs = token * stride_ot + head * stride_oh + d2
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP) & (d2 < HEAD_DIM))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(prefill: bool, group_pad: int, dtype: torch.dtype) -> dict:
    """Tile shape and launch options of one query-length class (checked for sm_90 spills)."""
    block_m = max(16, group_pad)
    if dtype == torch.float32:
        # NOTE: fp32 dots are exact FMA loops (no tensor cores): small tiles avoid spills.
        return dict(BLOCK_M=block_m, TILE_N=16, num_warps=4, num_stages=2)
    if not prefill:
        return dict(BLOCK_M=block_m, TILE_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=max(128, group_pad), TILE_N=64, num_warps=8, num_stages=3)


def _auto_num_splits(query: torch.Tensor, num_programs: int, max_seq_len: int) -> int:
    """Flash-decoding split count: about 4 programs per SM when fewer than 2 would run."""
    if not query.is_cuda:
        return 1
    sms = _num_sms(query.device.index or 0)
    if num_programs >= 2 * sms or max_seq_len < 2 * _MIN_KEYS_PER_SPLIT:
        return 1
    by_occupancy = -(-4 * sms // num_programs)
    return max(1, min(by_occupancy, max_seq_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def _launch_class(
    args: tuple, out_parts: tuple, query: torch.Tensor, key_cache: torch.Tensor,
    q_len_range: tuple[int, int], cfg: dict, meta: dict, num_splits: int,
) -> None:  # fmt: skip
    """One launch over the sequences whose query length lies in (lo, hi]."""
    num_tokens = query.shape[0]
    _, _, value_cache, block_tables, seq_lens = args[:5]
    num_seqs = seq_lens.shape[0]
    block_q = cfg["BLOCK_M"] // meta["GROUP_PAD"]
    grid = (num_tokens // block_q + num_seqs, key_cache.shape[2], num_splits)
    _paged_attention_kernel[grid](
        *out_parts, *args, num_seqs, query.shape[1], *q_len_range,
        query.stride(0), query.stride(1), out_parts[0].stride(0), out_parts[0].stride(1),
        block_tables.stride(0), *key_cache.stride()[:3], *value_cache.stride()[:3],
        BLOCK_Q=block_q, NUM_SPLITS=num_splits, **cfg, **meta,
    )  # fmt: skip


def _kernel_meta(query, key_cache, sliding_window, soft_cap) -> dict:
    """The compile-time constants shared by both query-length classes."""
    group = query.shape[1] // key_cache.shape[2]
    return dict(
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=query.shape[2],
        HEAD_DIM_PAD=triton.next_power_of_2(query.shape[2]),
        BLOCK_SIZE=key_cache.shape[1],
        USE_WINDOW=sliding_window is not None,
        USE_SOFT_CAP=soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.dtype == torch.bfloat16 and not query.is_cuda,
    )


def _split_buffers(out: torch.Tensor, num_splits: int, head_dim_pad: int) -> tuple:
    """(out, partial acc, partial max, partial sum); the partials only when splitting."""
    if num_splits == 1:
        return (out, out, out, out)
    num_tokens, num_heads = out.shape[:2]
    shape = (num_tokens, num_heads, num_splits)
    return (
        out,
        out.new_empty(*shape, head_dim_pad, dtype=torch.float32),
        out.new_empty(shape, dtype=torch.float32),
        out.new_empty(shape, dtype=torch.float32),
    )


def _score_multipliers(scale: float, soft_cap: float | None) -> tuple[float, float]:
    """(s_mul, cap_mul) for scores in base 2: s * s_mul, or cap_mul * tanh(s * s_mul)."""
    if soft_cap is None:
        return scale * _LOG2E, 0.0
    return scale / soft_cap, soft_cap * _LOG2E


def _num_splits(query, seq_lens, num_kv_heads: int, num_kv_splits: int | None,
                decode_only: bool, max_seq_len: int | None) -> int:  # fmt: skip
    """`num_kv_splits` where given; else split the KV only for decode-only batches on CUDA."""
    if num_kv_splits is not None or not (decode_only and query.is_cuda):
        return num_kv_splits or 1
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    return _auto_num_splits(query, seq_lens.shape[0] * num_kv_heads, max_seq_len)


def paged_attention_triton(
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
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton unified paged attention; same contract as `paged_attention_ref`.

    Extra keywords: `num_kv_splits` (None: automatic; 1: never split; > 1: force the
    split-KV path with that many slices, for any batch) and `out`, a [T, H, D] buffer to
    write into. The last dim of query and caches must be contiguous.
    """
    num_tokens, num_heads, _ = query.shape
    num_kv_heads = key_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert num_kv_splits is None or num_kv_splits >= 1
    if key_cache.dtype != torch.float8_e4m3fn:
        k_scale = v_scale = 1.0  # NOTE: only an FP8 cache is scaled
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    meta = _kernel_meta(query, key_cache, sliding_window, soft_cap)
    decode_cfg = _tile_config(False, meta["GROUP_PAD"], query.dtype)
    prefill_cfg = _tile_config(True, meta["GROUP_PAD"], query.dtype)
    decode_q = decode_cfg["BLOCK_M"] // meta["GROUP_PAD"]
    decode_only = max_query_len <= decode_q
    num_splits = _num_splits(query, seq_lens, num_kv_heads, num_kv_splits, decode_only,
                             max_seq_len)  # fmt: skip
    window = sliding_window if sliding_window is not None else 0
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    args += (*_score_multipliers(scale * k_scale, soft_cap), window)
    parts = _split_buffers(out, num_splits, meta["HEAD_DIM_PAD"])
    launch = functools.partial(_launch_class, args, parts, query, key_cache, meta=meta)
    no_limit = 2**31 - 1
    if decode_only or prefill_cfg == decode_cfg:
        launch((0, no_limit), decode_cfg, num_splits=num_splits)
    else:
        launch((0, decode_q), decode_cfg, num_splits=num_splits)
        launch((decode_q, no_limit), prefill_cfg, num_splits=num_splits)
    if num_splits > 1:
        _reduce_splits(parts, num_kv_heads, meta, num_splits)
    return out if v_scale == 1.0 else out.mul_(v_scale)


def _reduce_splits(parts: tuple, num_kv_heads: int, meta: dict, num_splits: int) -> None:
    """Merge the split-KV partials into `parts[0]`, the output."""
    out = parts[0]
    _reduce_splits_kernel[(out.shape[0], num_kv_heads)](
        out, *parts[1:], out.shape[1], out.stride(0), out.stride(1),
        GROUP=meta["GROUP"], GROUP_PAD=meta["GROUP_PAD"], NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=meta["HEAD_DIM"],
        HEAD_DIM_PAD=meta["HEAD_DIM_PAD"],
    )  # fmt: skip
