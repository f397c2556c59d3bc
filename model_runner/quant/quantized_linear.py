"""The 4-bit linear method: GGUF Q4_0/Q4_1/Q8_0 as stored, int4/int8 quantized at load, or
AWQ/GPTQ 4-bit checkpoints in group order on the CPU (`group_quant.int4_planes`, exact).

Rows arrive per shard (`load`) and are staged; `finalize` turns them into `Int4Planes` and
the layout of one of two kernels (`kernel`):

- `int8-dot` (`kernels.int8_dot_linear`, on CPUs with AVX-512 VNNI): 4-bit formats as q4,
  8-bit ones as q8, with int8 activations; the faster, where it is available.
- `int4` (`kernels.quant_linear`, torch's own GEMM): 4-bit planes, 8-bit formats as two.
 Where the int4 GEMM loses to a dense one at many rows (its cost grows
with every row, while a dense GEMM reads the weight once for all of them), the method also
keeps a dense bfloat16 copy of the same weight and takes it for steps of more than
`max_rows` rows: decode steps of a few sequences read 4-bit weights, prefill chunks and
large batches run dense.
"""

from __future__ import annotations

import logging

import torch

from kernels import int8_dot_linear
from kernels.quant_linear import int4_dequantize, int4_linear_planes, int4_pack
from model_runner.gguf_loader import GGUFBlocks
from model_runner.linear import (
    DenseLinear,
    DenseOptions,
    LinearMethod,
    WeightSource,
    as_float_tensor,
)
from model_runner.quant.group_quant import GroupQuantTensor, int4_planes
from model_runner.quant.int4_weights import (
    GGUF_INT4_TYPES,
    GROUP_SIZE,
    Int4Planes,
    concat_rows,
    from_gguf_blocks,
    q4_values,
    q8_values,
    quantize_int4,
    quantize_int8,
)

log = logging.getLogger(__name__)

QUANTIZERS = {"int4": quantize_int4, "int8": quantize_int8}
CHECKPOINT_MODES = ("awq", "gptq")  # 4-bit checkpoints, converted by group_quant.int4_planes
KERNELS = ("int8-dot", "int4")
# What the layout of each kernel and weight width is called (`QuantizedLinear.layout`).
LAYOUTS = {("int8-dot", 1): "q4", ("int8-dot", 2): "q8", ("int4", 1): "int4", ("int4", 2): "int4x2"}


def quantized_matmul(
    x: torch.Tensor, layout: str, packed: torch.Tensor, scales: torch.Tensor, float_out=False
) -> torch.Tensor:
    """x @ w.T for a weight in `layout` (one of LAYOUTS' values): x's dtype, or float32."""
    if layout == "q4":
        return int8_dot_linear.q4_linear(x, packed, scales, float_out)
    if layout == "q8":
        return int8_dot_linear.q8_linear(x, packed, scales, float_out)
    out = int4_linear_planes(x, packed, scales, GROUP_SIZE, 2 if layout == "int4x2" else 1)
    return out.float() if float_out else out


class QuantizedLinear(LinearMethod):
    """Weights in a quantized kernel layout (`mode`: gguf, int4 or int8; `kernel`: KERNELS).

    In `gguf` mode a projection whose shards are not all of one GGUF type in
    GGUF_INT4_TYPES is dequantized and served dense instead (logged at debug level).
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        mode: str,
        dtype: torch.dtype,
        max_rows: int | None,
        dense_options: DenseOptions,
        kernel: str = "int4",
    ):
        super().__init__(out_features, in_features)
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
        if kernel == "int8-dot" and not int8_dot_linear.fits(out_features, in_features):
            kernel = "int4"  # NOTE: its tiles need out_features % 16 == 0
        self.mode = mode
        self.kernel = kernel
        self.dtype = dtype
        self.max_rows = max_rows  # None: no dense copy
        self.dense_options = dense_options
        self._staged: list[tuple[int, WeightSource]] = []
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None  # the layout's scales (and zeros)
        self.planes = 1
        self.dense: DenseLinear | None = None

    @property
    def layout(self) -> str:
        return LAYOUTS[self.kernel, self.planes]

    @property
    def kind(self) -> str:
        if self.packed is None:
            return "dense (dequantized)"
        bits = {"q4": "4-bit", "q8": "8-bit", "int4": "4-bit", "int4x2": "8-bit as two 4-bit"}
        copy = f", dense above {self.max_rows} rows" if self.dense is not None else ""
        return f"{self.mode} {bits[self.layout]} ({self.kernel}){copy}"

    @property
    def weight(self) -> torch.Tensor | None:
        """The dense copy's weight (the LM head's table for lookups), if one is kept."""
        return None if self.dense is None else self.dense.weight

    def _load(self, start: int, source: WeightSource) -> None:
        self._staged.append((start, source))

    def finalize(self) -> None:
        staged = sorted(self._staged, key=lambda item: item[0])
        self._staged = []
        planes = self._planes([source for _, source in staged])
        if planes is None:
            self.dense = self._new_dense()
            for start, source in staged:
                self.dense.load(start, source)
            self.dense.finalize()
            return
        self.planes = planes.planes
        if self.max_rows is not None:
            self.dense = self._dense_copy(planes)
        if self.kernel == "int8-dot":
            if planes.planes == 1:
                self.packed, self.scales = int8_dot_linear.pack_q4(*q4_values(planes))
            else:
                self.packed, self.scales = int8_dot_linear.pack_q8(*q8_values(planes))
        else:
            self.packed, self.scales = int4_pack(planes.q), planes.scales_zeros(self.dtype)

    def _planes(self, sources: list[WeightSource]) -> Int4Planes | None:
        """The shards as 4-bit planes, or None where the mode serves them dense."""
        if self.mode in CHECKPOINT_MODES:  # NOTE: float shards: modules left unquantized
            if not all(isinstance(s, GroupQuantTensor) for s in sources):
                return None
            return concat_rows([int4_planes(s) for s in sources])
        if self.mode in QUANTIZERS:
            weight = torch.cat([as_float_tensor(s).float() for s in sources])
            return QUANTIZERS[self.mode](weight)
        types = {s.type_name if isinstance(s, GGUFBlocks) else "float" for s in sources}
        if len(types) != 1 or next(iter(types)) not in GGUF_INT4_TYPES:
            log.debug("GGUF types %s: served dense", sorted(types))
            return None
        return concat_rows([from_gguf_blocks(s) for s in sources])

    def _dense_copy(self, planes: Int4Planes) -> DenseLinear:
        """The same weight as the kernel sees it, rounded to `dtype`, for many-row steps."""
        scales = planes.scales_zeros(torch.float32 if self.kernel == "int8-dot" else self.dtype)
        weight = int4_dequantize(planes.q, scales, GROUP_SIZE)
        if planes.planes == 2:
            k = self.in_features
            weight = weight[:, :k] + weight[:, k:]
        dense = self._new_dense(weight.to(self.dtype))
        dense.finalize()
        return dense

    def _new_dense(self, weight: torch.Tensor | None = None) -> DenseLinear:
        """A dense CPU method of this projection's shape (its weight loaded later if None)."""
        return DenseLinear(self.out_features, self.in_features, self.dtype, torch.device("cpu"),
                           self.dense_options, weight=weight)  # fmt: skip

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None or (self.dense is not None and x.shape[0] > self.max_rows):
            return self.dense.apply(x, bias)
        out = quantized_matmul(x, self.layout, self.packed, self.scales)
        return out if bias is None else out.add_(bias)
