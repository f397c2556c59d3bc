"""Triton grouped LoRA shrink and expand: one program per (token, column block).

Each program reads its token's slot and that slot's A (or B) tile, so tokens of different
adapters share a launch; a token with slot -1 writes zeros (shrink) or leaves y alone
(expand). Ranks are small (R <= a few hundred), so a whole rank fits one block.
NOTE: per-token programs read an adapter's weights once per token; a prefill of many
tokens of one adapter would be faster grouped by slot (vLLM's SGMV). Decode is the target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, hidden, rank, stride_x, stride_as,
                        stride_ar, stride_h, BLOCK_R: tl.constexpr,
                        BLOCK_H: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + t)
    # NOTE: no adapter: every load masked off (limits of 0), so h gets zeros.
    h_lim = tl.where(slot >= 0, hidden, 0)
    base = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + t * stride_x + cols, mask=cols < h_lim, other=0.0)
        a_mask = (r[:, None] < rank) & (cols[None, :] < h_lim)
        a = tl.load(base + r[:, None] * stride_ar + cols[None, :], mask=a_mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(h_ptr + t * stride_h + r, acc.to(h_ptr.dtype.element_ty), mask=r < rank)


@triton.jit
def _lora_expand_kernel(y_ptr, h_ptr, b_ptr, slots_ptr, scales_ptr, rank, out, stride_y,
                        stride_h, stride_bs, stride_br, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t)
    n_lim = tl.where(slot >= 0, out, 0)  # NOTE: no adapter: y is neither read nor written
    s = tl.maximum(slot, 0)
    r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + t * stride_h + r, mask=r < rank, other=0.0).to(tl.float32)
    b_mask = (r[:, None] < rank) & (n[None, :] < n_lim)
    b = tl.load(b_ptr + s.to(tl.int64) * stride_bs + r[:, None] * stride_br + n[None, :],
                mask=b_mask, other=0.0)  # fmt: skip
    delta = tl.sum(b.to(tl.float32) * h[:, None], axis=0) * tl.load(scales_ptr + s)
    mask = n < n_lim
    y = tl.load(y_ptr + t * stride_y + n, mask=mask, other=0.0)
    tl.store(y_ptr + t * stride_y + n, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def lora_shrink_triton(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """Triton `kernels.lora.lora_shrink_ref`."""
    tokens, hidden = x.shape
    _, rank, _ = lora_a.shape
    assert x.stride(1) == 1 and lora_a.stride(2) == 1
    h = x.new_empty(tokens, rank)
    if tokens == 0:
        return h
    block_r = min(triton.next_power_of_2(rank), 64)
    block_h = 128 if block_r > 32 else 256
    grid = (tokens, triton.cdiv(rank, block_r))
    _lora_shrink_kernel[grid](
        x, lora_a, token_slots, h, hidden, rank, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), h.stride(0), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return h


def lora_expand_triton(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Triton `kernels.lora.lora_expand_ref` (y may be a column slice: any row stride)."""
    tokens, out = y.shape
    _, rank, _ = lora_b.shape
    assert y.stride(1) == 1 and h.stride(1) == 1 and lora_b.stride(2) == 1
    if tokens == 0:
        return
    block_r = triton.next_power_of_2(rank)
    block_n = max(16, min(128, 8192 // block_r))
    grid = (tokens, triton.cdiv(out, block_n))
    _lora_expand_kernel[grid](
        y, h, lora_b, token_slots, scales, rank, out, y.stride(0), h.stride(0),
        lora_b.stride(0), lora_b.stride(1), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
