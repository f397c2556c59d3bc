"""Triton rotary position embedding (NeoX and GPT-J layouts) over query and key at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, stride_xh, stride_oh, cos, sin,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
):  # fmt: skip
    """Rotate the first 2 * ROT_HALF features of every head of one token; copy the rest."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (i < ROT_HALF)
    if IS_NEOX:
        i1 = i
        i2 = i + ROT_HALF
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    x1 = tl.load(x_ptr + h * stride_xh + i1, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + h * stride_xh + i2, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = x1f * cos - x2f * sin
    o2 = x2f * cos + x1f * sin
    if 2 * ROT_HALF < HEAD_DIM:
        d = tl.arange(0, DIM_PAD)[None, :]
        tail = (h < NUM_HEADS) & (d >= 2 * ROT_HALF) & (d < HEAD_DIM)
        rest = tl.load(x_ptr + h * stride_xh + d, mask=tail, other=0.0)
        tl.store(o_ptr + h * stride_oh + d, rest, mask=tail)
    tl.store(o_ptr + h * stride_oh + i1, o1.to(x1.dtype), mask=mask)
    tl.store(o_ptr + h * stride_oh + i2, o2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cache, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_PAD: tl.constexpr,
    K_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, ROT_HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=i < ROT_HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + ROT_HALF + i, mask=i < ROT_HALF, other=0.0)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh, stride_qoh,
        cos, sin, NUM_Q_HEADS, Q_PAD, HEAD_DIM, DIM_PAD, ROT_HALF, HALF_PAD, IS_NEOX,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh, stride_koh,
        cos, sin, NUM_K_HEADS, K_PAD, HEAD_DIM, DIM_PAD, ROT_HALF, HALF_PAD, IS_NEOX,
    )  # fmt: skip


def rotary_embedding_triton(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `rotary_embedding_ref`; `out` = (q, k) buffers, (query, key) allowed (in place)."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    rot_dim = cos_sin_cache.shape[-1]
    if out is None:
        out = (
            torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
        )
    if num_tokens == 0:
        return out
    q_out, k_out = out
    for t in (query, key, q_out, k_out, cos_sin_cache):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
    _rotary_kernel[(num_tokens,)](
        positions, query, key, q_out, k_out, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
        Q_PAD=triton.next_power_of_2(num_q_heads), K_PAD=triton.next_power_of_2(num_k_heads),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), ROT_HALF=rot_dim // 2,
        HALF_PAD=triton.next_power_of_2(rot_dim // 2), IS_NEOX=is_neox,
        num_warps=4 if num_q_heads * head_dim >= 2048 else 2,
    )  # fmt: skip
    return out
