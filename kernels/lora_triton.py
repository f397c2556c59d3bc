"""Triton grouped LoRA shrink and expand: one program per (token, column block).

Each program reads its token's slot and that slot's A (or B) tile, so tokens of different
adapters share a launch; a token with slot -1 writes zeros (shrink) or leaves y alone
(expand): its reduction loop has no trips, so it reads no weights. Both kernels loop over
their reduction dimension (H for shrink, R for expand) in blocks with fp32 accumulation, so
padded ranks up to 3 * 512 (q/k/v stacked at --max-lora-rank 512) keep tiles of <= 8192.
NOTE: per-token programs read an adapter's weights once per token; a prefill of many
tokens of one adapter would be faster grouped by slot (vLLM's SGMV). Decode is the target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 8192  # elements of one program's weight tile


def shrink_blocks(rank: int) -> dict:
    """The launcher's block sizes for a padded rank (the sm_90 compile test mirrors them)."""
    block_r = min(max(triton.next_power_of_2(rank), 8), 64)
    return dict(BLOCK_R=block_r, BLOCK_H=min(512, TILE // block_r))


def expand_blocks(rank: int) -> dict:
    block_r = min(max(triton.next_power_of_2(rank), 8), 64)
    return dict(BLOCK_R=block_r, BLOCK_N=min(128, TILE // block_r))


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, hidden, rank, stride_x, stride_as,
                        stride_ar, stride_h, BLOCK_R: tl.constexpr,
                        BLOCK_H: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + t)
    # NOTE: no adapter: no trips, so h gets the zeros it starts with.
    h_lim = tl.where(slot >= 0, hidden, 0)
    base = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, h_lim, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + t * stride_x + cols, mask=cols < hidden, other=0.0)
        a_mask = (r[:, None] < rank) & (cols[None, :] < hidden)
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
    # NOTE: no adapter: no trips and no store, so y is neither read nor written.
    r_lim = tl.where(slot >= 0, rank, 0)
    s = tl.maximum(slot, 0)
    base = b_ptr + s.to(tl.int64) * stride_bs
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, r_lim, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + t * stride_h + r, mask=r < rank, other=0.0).to(tl.float32)
        b_mask = (r[:, None] < rank) & (n[None, :] < out)
        b = tl.load(base + r[:, None] * stride_br + n[None, :], mask=b_mask, other=0.0)
        acc += tl.sum(b.to(tl.float32) * h[:, None], axis=0)
    mask = n < tl.where(slot >= 0, out, 0)
    y = tl.load(y_ptr + t * stride_y + n, mask=mask, other=0.0)
    delta = acc * tl.load(scales_ptr + s).to(tl.float32)
    tl.store(y_ptr + t * stride_y + n, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def lora_shrink_triton(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """Triton `kernels.lora.lora_shrink_ref` (x may have any row stride)."""
    tokens, hidden = x.shape
    _, rank, _ = lora_a.shape
    assert x.stride(1) == 1 and lora_a.stride(2) == 1
    h = x.new_empty(tokens, rank)
    if tokens == 0:
        return h
    blocks = shrink_blocks(rank)
    grid = (tokens, triton.cdiv(rank, blocks["BLOCK_R"]))
    _lora_shrink_kernel[grid](
        x, lora_a, token_slots, h, hidden, rank, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), h.stride(0), **blocks, num_warps=4,
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
    if tokens == 0 or out == 0:
        return
    blocks = expand_blocks(rank)
    grid = (tokens, triton.cdiv(out, blocks["BLOCK_N"]))
    _lora_expand_kernel[grid](
        y, h, lora_b, token_slots, scales, rank, out, y.stride(0), h.stride(0),
        lora_b.stride(0), lora_b.stride(1), **blocks, num_warps=4,
    )  # fmt: skip
