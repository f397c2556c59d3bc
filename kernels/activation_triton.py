"""Triton SiLU-and-mul of the gated Llama MLP."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `silu_and_mul_ref`: x [..., 2 * d] as [gate | up] -> silu(gate) * up [..., d].

    Math in fp32; `out` is an optional [..., d] buffer to write into.
    """
    d = x.shape[-1] // 2
    if out is None:
        out = x.new_empty(*x.shape[:-1], d)
    x2 = x.reshape(-1, x.shape[-1])
    o2 = out.view(-1, d)
    assert x2.stride(-1) == 1 and o2.stride(-1) == 1
    rows = x2.shape[0]
    if rows == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(d))
    grid = (rows, triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](
        x2, o2, d, x2.stride(0), o2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 2
    )
    return out
