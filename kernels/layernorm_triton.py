"""Triton RMSNorm, alone and fused with the residual add (one pass over each row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_out_ptr, hidden, eps,
    stride_x, stride_r, stride_o, stride_s,
    BLOCK: tl.constexpr, FUSED_ADD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if FUSED_ADD:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # NOTE: the sum is rounded to x's dtype before the norm, like the reference.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_out_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (xf * inv_rms * w).to(x.dtype), mask=mask)


def _launch(x, residual, weight, eps, out, sum_out, fused: bool) -> None:
    hidden = x.shape[-1]
    rows = x.shape[0]
    if rows == 0:
        return
    for t in (x, residual, out, sum_out, weight):
        assert t.stride(-1) == 1, "the hidden dim must be contiguous"
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(rows,)](
        x, residual, weight, out, sum_out, hidden, eps,
        x.stride(0), residual.stride(0), out.stride(0), sum_out.stride(0),
        BLOCK=block, FUSED_ADD=fused, num_warps=num_warps,
    )  # fmt: skip


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton `rms_norm_ref` over the last dim; `out` (may be x itself) is optional."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    _launch(x2, x2, weight, eps, o2, o2, fused=False)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `fused_add_rms_norm_ref`: returns (rms_norm(x + residual), x + residual).

    `out` = (normed, summed) buffers to write into; (x, residual) itself is allowed (in place).
    """
    if out is None:
        out = (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
        )
    hidden = x.shape[-1]
    normed, summed = out[0].view(-1, hidden), out[1].view(-1, hidden)
    _launch(x.reshape(-1, hidden), residual.reshape(-1, hidden), weight, eps, normed, summed, True)
    return out
