"""RMSNorm, alone and fused with the residual add."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    if x.dtype == weight.dtype:
        # NOTE: torch's own op: the same fp32 math as below, bit for bit, in fewer ops.
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()  # NOTE: x itself in fp32, so only fresh tensors are updated in place
    inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (xf * inv_rms).mul_(weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), the norm in x's dtype.

    With one dtype (the Triton kernel's case) the sum is kept in it (torch adds bf16/fp16
    in fp32 and rounds once). A float32 `residual` under bf16/fp16 `x` (the CPU's residual
    stream) keeps the sum in float32, and `weight` is then float32 too.
    """
    if x.dtype == residual.dtype:
        summed = x + residual
        return rms_norm_ref(summed, weight, eps), summed
    summed = residual + x
    return rms_norm_ref(summed, weight, eps).to(x.dtype), summed
