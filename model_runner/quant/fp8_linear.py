"""FP8 projections: an FP8 checkpoint's weights, or float weights quantized at load
(`--quantization fp8`: per-output-channel scales).

On CUDA the matmul is `kernels.fp8_linear.fp8_linear` (activations quantized per token, or
by the checkpoint's static scale; `torch._scaled_mm`). On the CPU it is a dequantizing
reference: the FP8 weight times its scales in the activation dtype, activations unrounded
(so the CPU serves exactly the checkpoint's weights; activation rounding is the GPU's).
NOTE: shards with per-tensor scales become per-row scales, exact for any mix; static input
scales of fused shards take their maximum (as vLLM), so no activation overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fp8_linear import fp8_dequantize, fp8_linear, fp8_quantize_rows
from model_runner.linear import as_float_tensor
from model_runner.quant.fp8_weights import Fp8Tensor
from model_runner.quant.staged_linear import StagedLinear

SCALED_MM_MULTIPLE = 16  # torch._scaled_mm needs K and N multiples of 16
# NOTE: its row-wise scales (per token times per channel) need a bfloat16 output on CUDA.


class Fp8Linear(StagedLinear):
    """FP8 weight [N, K] with float32 per-row scales [N]."""

    source_type = Fp8Tensor

    def __init__(
        self, out_features, in_features, dtype, device, dense_options, quantize_floats=False
    ):
        super().__init__(out_features, in_features, dtype, device, dense_options,
                         quantize_floats)  # fmt: skip
        self.fp8_weight = self.weight_scale = self.input_scale = None
        self.scaled_mm = (
            device.type == "cuda"
            and dtype == torch.bfloat16
            and not (out_features % SCALED_MM_MULTIPLE or in_features % SCALED_MM_MULTIPLE)
        )

    @property
    def kind(self) -> str:
        if self.dense is not None:
            return "dense (not quantized in the checkpoint)"
        if not self.scaled_mm:
            return "fp8 (dequantized weights)"
        acts = "static" if self.input_scale is not None else "per-token"
        return f"fp8 (scaled_mm, {acts} activations)"

    def _quantize_float(self, weight) -> Fp8Tensor:
        w, scale = fp8_quantize_rows(as_float_tensor(weight).float())
        return Fp8Tensor(w, scale.reshape(-1))

    def _build(self, sources: list[Fp8Tensor]) -> None:
        self.fp8_weight = torch.cat([s.weight for s in sources]).to(self.device).contiguous()
        self.weight_scale = torch.cat([s.weight_scale for s in sources]).to(self.device)
        static = [s.input_scale for s in sources if s.input_scale is not None]
        if static:
            self.input_scale = torch.stack(static).max().to(self.device)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm:
            return fp8_linear(x, self.fp8_weight, self.weight_scale, self.input_scale)
        weight = fp8_dequantize(self.fp8_weight, self.weight_scale).to(x.dtype)
        return F.linear(x, weight)
