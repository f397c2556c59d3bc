"""RMSNorm, alone and fused with the residual add."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()  # NOTE: x itself in fp32, so only fresh tensors are updated in place
    inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (xf * inv_rms).mul_(weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is kept in x's dtype."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(summed, weight, eps), summed
