"""FP8 (e4m3) GEMMs: per-token activation scales times per-channel weight scales.

`fp8_linear` quantizes x per row (dynamic) or with one static scale, then multiplies in FP8
through `torch._scaled_mm` (Hopper tensor cores on CUDA; torch also runs it on the CPU),
with the scales applied to the fp32 accumulator. `fp8_linear_ref` is its torch reference:
the same quantization of x, dequantized operands, an fp32 GEMM.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # NOTE: an all-zero row gets this scale, so no division by zero


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (FP8 [R, C], float32 scales [R, 1]) with x ~= q * scale per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=MIN_SCALE)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in FP8 (a checkpoint's static activation scale, one float)."""
    return (x.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def _activations(x: torch.Tensor, input_scale: torch.Tensor | None):
    if input_scale is None:
        return fp8_quantize_rows(x)
    scale = input_scale.float().reshape(1, 1)
    return fp8_quantize_static(x, scale), scale


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] FP8 * weight_scale [N]) -> [M, N] in x's dtype.

    `input_scale`: a static per-tensor activation scale, or None for per-token scales.
    """
    xq, x_scale = _activations(x, input_scale)
    if input_scale is not None and x_scale.shape != (x.shape[0], 1):
        x_scale = x_scale.expand(x.shape[0], 1).contiguous()
    return torch._scaled_mm(
        xq.contiguous(), weight.t(), scale_a=x_scale, scale_b=weight_scale.float().view(1, -1),
        out_dtype=x.dtype,
    )  # fmt: skip


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `fp8_linear`: the same FP8 operands, dequantized, fp32 GEMM."""
    xq, x_scale = _activations(x, input_scale)
    w = fp8_dequantize(weight, weight_scale)
    return ((xq.float() * x_scale) @ w.t()).to(x.dtype)


def fp8_dequantize(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight [N, K] with per-row scales [N] -> float32 [N, K]."""
    return weight.float() * weight_scale.float().view(-1, 1)
