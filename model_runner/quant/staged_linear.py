"""The common part of the checkpoint-format linear methods (W4A16, FP8): shards are staged
as they load and joined in `finalize`.

A projection whose shards all arrive as float tensors is served dense when the method does
not quantize floats (a checkpoint's ignored modules); float shards are quantized when it
does (`--quantization fp8`, dummy weights); a mix of quantized and float shards of one
fused projection in a checkpoint is refused.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from model_runner.linear import DenseLinear, DenseOptions, LinearMethod, WeightSource
from model_runner.quant.checkpoint_quant import CheckpointQuantError


class StagedLinear(LinearMethod):
    """Stages (start row, source) pairs; `_build` turns the sorted shards into the layout."""

    source_type: type = object  # the checkpoint source the method serves

    def __init__(
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        device: torch.device,
        dense_options: DenseOptions,
        quantize_floats: bool,
    ):
        super().__init__(out_features, in_features)  # fmt: skip
        self.dtype = dtype
        self.device = device
        self.dense_options = dense_options
        self.quantize_floats = quantize_floats
        self._staged: list[tuple[int, WeightSource]] = []
        self.dense: DenseLinear | None = None

    @property
    def weight(self) -> torch.Tensor | None:
        return None if self.dense is None else self.dense.weight

    def _load(self, start: int, source: WeightSource) -> None:
        if self.quantize_floats and not isinstance(source, self.source_type):
            source = self._quantize_float(source)  # NOTE: at once, so no float copy waits
        self._staged.append((start, source))

    def finalize(self) -> None:
        staged = sorted(self._staged, key=lambda item: item[0])
        self._staged = []
        quantized = [isinstance(s, self.source_type) for _, s in staged]
        if not any(quantized) and not self.quantize_floats:
            self.dense = DenseLinear(self.out_features, self.in_features, self.dtype,
                                     self.device, self.dense_options)  # fmt: skip
            for start, source in staged:
                self.dense.load(start, source)
            self.dense.finalize()
            return
        if not all(quantized):
            raise CheckpointQuantError(
                f"a fused projection [{self.out_features}, {self.in_features}] mixes quantized "
                "and float shards"
            )
        self._build([source for _, source in staged])

    @abstractmethod
    def _quantize_float(self, weight: torch.Tensor): ...

    @abstractmethod
    def _build(self, sources: list) -> None: ...

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.apply(x, bias)
        out = self._matmul(x)
        return out if bias is None else out + bias

    @abstractmethod
    def _matmul(self, x: torch.Tensor) -> torch.Tensor: ...
