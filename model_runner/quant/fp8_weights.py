"""FP8 checkpoint tensors (the compressed-tensors / vLLM layout) as one weight source.

A projection stores `weight` float8_e4m3fn [N, K], `weight_scale` float32 (one per tensor:
shape [] or [1]; or one per output channel: [N] or [N, 1]) and, with static activation
scales, `input_scale` (one float). w = weight * weight_scale (per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.fp8_linear import FP8, fp8_dequantize
from model_runner.quant.checkpoint_quant import CheckpointQuant, CheckpointQuantError


@dataclass(frozen=True)
class Fp8Tensor:
    """One [N, K] FP8 weight with per-row float32 scales [N] (a tensor scale repeated)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None  # [] float32: a static activation scale

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        return fp8_dequantize(self.weight, self.weight_scale)


def fp8_tensor(name: str, parts: dict[str, torch.Tensor], quant: CheckpointQuant) -> Fp8Tensor:
    """The FP8 projection `name` from its checkpoint parts (shapes and dtypes checked)."""
    weight, scale = parts["weight"], parts["weight_scale"].float()
    if weight.dtype != FP8 or weight.dim() != 2:
        raise CheckpointQuantError(
            f"{name}.weight is {weight.dtype} of shape {tuple(weight.shape)}; expected a 2-D "
            "float8_e4m3fn tensor"
        )
    rows = weight.shape[0]
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(rows).contiguous()
    elif tuple(scale.shape) in ((rows,), (rows, 1)):
        scale = scale.reshape(rows)
    else:
        raise CheckpointQuantError(
            f"{name}.weight_scale has shape {tuple(scale.shape)}; expected one scale per "
            f"tensor or per output channel ({rows},)"
        )
    input_scale = parts.get("input_scale")
    if quant.static_activations:
        if input_scale is None:
            raise CheckpointQuantError(
                f"{name}: missing input_scale (the quantization_config has static activations)"
            )
        if input_scale.numel() != 1:
            raise CheckpointQuantError(
                f"{name}.input_scale has shape {tuple(input_scale.shape)}; expected one float"
            )
        input_scale = input_scale.float().reshape(())
    else:
        input_scale = None  # NOTE: dynamic per-token scales; a stored one is not needed
    return Fp8Tensor(weight, scale, input_scale)
