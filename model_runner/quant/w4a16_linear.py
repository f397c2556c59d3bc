"""AWQ / GPTQ projections through the W4A16 GEMM (`kernels.ops.w4a16_linear`): the Triton
kernel on CUDA, its dequantizing torch reference on the CPU.

`finalize` joins the shards along the output columns. With `desc_act` (a g_idx that is not
k // group_size) the input features are sorted by group once at load, so each group is
contiguous for the kernel, and every call gathers x's columns in that order (`perm`).
NOTE: the shards of one fused projection share their input, so GPTQ gives them one g_idx;
differing ones are refused.
"""

from __future__ import annotations

import torch

from kernels import ops
from kernels.w4a16 import pack_along_k, unpack_along_k
from model_runner.linear import as_float_tensor
from model_runner.quant.checkpoint_quant import CheckpointQuant, CheckpointQuantError
from model_runner.quant.group_quant import GroupQuantTensor, quantize_rtn
from model_runner.quant.staged_linear import StagedLinear


class W4A16Linear(StagedLinear):
    """An AWQ or GPTQ weight (`quant.method`) in the W4A16 layout."""

    source_type = GroupQuantTensor

    def __init__(
        self,
        out_features,
        in_features,
        quant: CheckpointQuant,
        dtype,
        device,
        dense_options,
        quantize_floats=False,
    ):
        super().__init__(out_features, in_features, dtype, device, dense_options,
                         quantize_floats)  # fmt: skip
        self.quant = quant
        self.qweight = self.scales = self.zeros = self.perm = None
        self.bits, self.group_size = quant.bits, quant.group_size

    @property
    def kind(self) -> str:
        if self.dense is not None:
            return "dense (not quantized in the checkpoint)"
        order = ", act-order" if self.perm is not None else ""
        return f"{self.quant.method} {self.bits}-bit g{self.group_size}{order} (w4a16)"

    def _quantize_float(self, weight) -> GroupQuantTensor:
        return quantize_rtn(as_float_tensor(weight), self.quant.bits, self.quant.group_size)

    def _build(self, sources: list[GroupQuantTensor]) -> None:
        first = sources[0]
        if any(not torch.equal(s.g_idx, first.g_idx) for s in sources[1:]):
            raise CheckpointQuantError("the shards of a fused projection have different g_idx")
        if any((s.bits, s.group_size) != (first.bits, first.group_size) for s in sources):
            raise CheckpointQuantError("the shards of a fused projection differ in bits/groups")
        self.bits, self.group_size = first.bits, first.group_size
        qweight = torch.cat([s.qweight for s in sources], dim=1)
        scales = torch.cat([s.scales for s in sources], dim=1)
        zeros = torch.cat([s.zeros for s in sources], dim=1)
        contiguous = torch.arange(first.g_idx.shape[0]) // first.group_size
        if not torch.equal(first.g_idx, contiguous):
            qweight = self._sort_by_group(qweight, first.g_idx, contiguous)
        to = dict(device=self.device)
        self.qweight = qweight.to(**to).contiguous()
        self.scales, self.zeros = scales.to(**to).contiguous(), zeros.to(**to).contiguous()

    def _sort_by_group(self, qweight, g_idx, contiguous) -> torch.Tensor:
        """Input features sorted by group (desc_act): the words repacked in that order."""
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], contiguous):
            raise CheckpointQuantError(
                f"g_idx does not give every group exactly {self.group_size} input features"
            )
        q = unpack_along_k(qweight, self.bits)[perm]
        self.perm = perm.to(self.device)
        return pack_along_k(q, self.bits)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        return ops.w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size,
                                self.bits)  # fmt: skip
