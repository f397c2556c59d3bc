"""Linear layers, with MKL-packed weights for one decode batch size on the CPU.

At batch 32 a float32 GEMM on the CPU spends much of its time packing the weight into
MKL's internal panels, on every call. `pack_linear_weight` does that once at load time for
one batch size (as torch.compile's CPU freezing pass does for a static batch); `linear`
then uses the packed copy when a step's rows equal that size, or pads rows up to it when
there are more than half as many. Every other shape takes the plain `F.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Set on a weight Parameter by `pack_linear_weight` (as vLLM sets loader attributes).
PACKED_ATTR = "mkl_packed"


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """MKL's packed copy of a [out, in] weight, valid for inputs of exactly `batch` rows."""

    batch: int
    data: torch.Tensor


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed float32 GEMM (x86 builds do)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@torch.no_grad()
def pack_linear_weight(weight: torch.Tensor, batch: int) -> None:
    """Attach MKL's packed copy of a CPU float32 `weight` for `batch`-row inputs."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), batch)
    setattr(weight, PACKED_ATTR, PackedWeight(batch, packed))


def packed_matches_plain(weight: torch.Tensor) -> bool:
    """Self-check of a packed weight against `F.linear` on random rows (a bad MKL is off)."""
    packed: PackedWeight = getattr(weight, PACKED_ATTR)
    x = torch.randn(packed.batch, weight.shape[1], dtype=weight.dtype)
    expected = F.linear(x, weight)
    got = torch.ops.mkl._mkl_linear(x, packed.data, weight, None, packed.batch)
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`F.linear` of 2-D `x`, through the packed weight when its batch fits (see module)."""
    packed: PackedWeight | None = getattr(weight, PACKED_ATTR, None)
    rows = x.shape[0]
    if packed is None or not packed.batch // 2 < rows <= packed.batch:
        return F.linear(x, weight, bias)
    # NOTE: MKL reads x as dense rows (lda = in_features), so x must be contiguous.
    if rows == packed.batch:
        return torch.ops.mkl._mkl_linear(x.contiguous(), packed.data, weight, bias, rows)
    # Zero rows pad the batch; their outputs are computed and dropped.
    padded = F.pad(x, (0, 0, 0, packed.batch - rows))
    return torch.ops.mkl._mkl_linear(padded, packed.data, weight, bias, packed.batch)[:rows]
