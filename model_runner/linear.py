"""The linear-method seam: how one projection stores its weight, loads it and multiplies by it.

A `Linear` layer is a fused projection of one or more shards (q/k/v, gate/up) stacked along
the output rows; `offsets[i]` is where shard i starts. Its `LinearMethod` owns the storage:

- `load(start, source)` receives the rows [start, start + rows) of the weight, either a float
  tensor or the GGUF blocks of a quantized tensor (`GGUFBlocks`);
- `finalize()` runs once every row is loaded and turns the rows into the kernel's layout
  (transposed or library-packed on the CPU, 4-bit planes for the quantized methods);
- `apply(x, bias)` is the matmul.

A new weight format is a new method (model_runner.quant), never a branch in the model code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kernels.linear import PackedWeight, linear, pack_linear_weight, packed_matches_plain
from model_runner.gguf_loader import GGUFBlocks
from model_runner.model_source import ModelSourceError

# NOTE: a checkpoint's quantized projection (model_runner.quant: AWQ/GPTQ, FP8) is a source
# too: anything with a [N, K] `shape` and a float32 `dequantize()`.
WeightSource = torch.Tensor | np.ndarray | GGUFBlocks | object


def as_float_tensor(source: WeightSource) -> torch.Tensor:
    """A weight source as a float tensor (quantized sources are dequantized to float32)."""
    if isinstance(source, torch.Tensor):
        return source
    if isinstance(source, np.ndarray):
        return torch.from_numpy(np.require(source, requirements=["C", "W"]))
    return as_float_tensor(source.dequantize())


class LinearMethod(ABC):
    """One [out_features, in_features] weight: storage, loading and the matmul."""

    kind = "linear"

    def __init__(self, out_features: int, in_features: int):
        self.out_features = out_features
        self.in_features = in_features
        self.rows_loaded = 0

    def load(self, start: int, source: WeightSource) -> None:
        """Store rows [start, start + rows of `source`)."""
        rows, cols = source.shape
        if cols != self.in_features or not 0 <= start <= start + rows <= self.out_features:
            raise ModelSourceError(
                f"a weight of shape {tuple(source.shape)} does not fit rows {start}.. of "
                f"[{self.out_features}, {self.in_features}]"
            )
        self._load(start, source)
        self.rows_loaded += rows

    @abstractmethod
    def _load(self, start: int, source: WeightSource) -> None: ...

    def finalize(self) -> None:  # noqa: B027 (an optional hook)
        """Every row is loaded: build the kernel layout (a no-op by default)."""

    @abstractmethod
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in_features] -> [M, out_features]."""


@dataclass(frozen=True)
class DenseOptions:
    """CPU layout choices of dense weights (`model_runner.linear_plan` decides them)."""

    transpose: bool = False  # float32 on the CPU: stored column-major for MKL
    pack_batch: int = 0  # > 0: keep a library-packed copy for steps of this many rows


class DenseLinear(LinearMethod):
    """A float weight (fp32/bf16/fp16) through the vendor GEMM; optionally library-packed."""

    kind = "dense"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        device: torch.device,
        options: DenseOptions = DenseOptions(),
        weight: torch.Tensor | None = None,
    ):
        super().__init__(out_features, in_features)
        self.options = options
        self.weight = (
            torch.empty(out_features, in_features, dtype=dtype, device=device)
            if weight is None
            else weight
        )
        self.packed: PackedWeight | None = None

    @torch.no_grad()
    def _load(self, start: int, source: WeightSource) -> None:
        tensor = as_float_tensor(source)
        self.weight[start : start + tensor.shape[0]].copy_(tensor)

    @torch.no_grad()
    def finalize(self) -> None:
        if self.options.transpose:
            # NOTE: F.linear(x, W) is x @ W.t(); with W.t() contiguous MKL's fp32 GEMM needs no
            # transposed operand (1.2-1.8x faster at 8-32 rows, bit-identical results).
            self.weight.data = self.weight.data.t().contiguous().t()
        if self.options.pack_batch:
            self.packed = pack_linear_weight(self.weight, self.options.pack_batch)

    def packing_works(self) -> bool:
        """Self-check of the packed copy against F.linear (a library may disagree)."""
        return self.packed is None or packed_matches_plain(self.weight, self.packed)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, bias, self.packed)


class RowParallelLinear(LinearMethod):
    """Tensor parallel, row-parallel: this rank holds a slice of the input features and its
    partial products are summed over ranks (o_proj, down_proj). A bias is added once, after.

    NOTE: a column-parallel projection needs no method of its own: it is a plain method of
    this rank's output rows (the loader hands it only those rows).
    """

    kind = "row-parallel"

    def __init__(self, inner: LinearMethod, tp):
        super().__init__(inner.out_features, inner.in_features)
        self.inner = inner
        self.tp = tp  # model_runner.parallel.TensorParallel
        self.kind = f"row-parallel {inner.kind}"

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def _load(self, start: int, source: WeightSource) -> None:
        self.inner.load(start, source)

    def finalize(self) -> None:
        self.inner.finalize()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.tp.all_reduce(self.inner.apply(x))
        return y if bias is None else y + bias


class Linear(nn.Module):
    """A projection made of `output_sizes` shards stacked along the output rows."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        method: LinearMethod,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.offsets = tuple(int(x) for x in np.cumsum((0, *self.output_sizes[:-1])))
        self.out_features = sum(self.output_sizes)
        assert (method.out_features, method.in_features) == (self.out_features, in_features)
        self.method = method
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), False)
            if bias
            else None
        )
        self.lora = None  # model_runner.lora.LoraStacks: adapter deltas added on top

    def load(self, shard: int, source: WeightSource) -> None:
        """Load the weight of shard `shard` (its rows start at `offsets[shard]`)."""
        if source.shape[0] != self.output_sizes[shard]:
            raise ModelSourceError(
                f"shard {shard} has {source.shape[0]} rows, expected {self.output_sizes[shard]}"
            )
        self.method.load(self.offsets[shard], source)

    def finalize(self) -> None:
        if self.method.rows_loaded != self.out_features:
            raise ModelSourceError(
                f"a projection got {self.method.rows_loaded} of {self.out_features} weight rows"
            )
        self.method.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(x, self.bias)
        return y if self.lora is None else self.lora.add_to(y, x)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {list(self.output_sizes)}, {self.method.kind}"
