"""Linear layers, with weights pre-packed for the CPU's GEMM libraries.

At decode batch sizes a CPU GEMM spends much of its time re-packing the weight into the
library's internal panels, on every call. `pack_linear_weight` does that once at load time
(as torch.compile's CPU freezing pass does for static shapes):

- float32: MKL's packed GEMM, valid for inputs of exactly `batch` rows; `linear` pads a step
  of more than half as many rows up to it, and leaves every other shape to `F.linear`.
- bfloat16: oneDNN's blocked weight layout (`batch` is only its layout hint), for any rows.

oneDNN (the bf16 GEMMs, packed or not) builds and caches a primitive per input shape, so a
server whose prefill chunks take every length from 1 to 2048 tokens grows by each new one
(~10 MiB a minute of a 30-minute soak). Above 64 rows `linear` pads bf16 inputs with zero
rows up to `padded_rows` (at most 1/8 more rows, 8 sizes per power of two), which bounds
the shapes to ~100 per weight.

The model runner's dense linear method (`model_runner.linear.DenseLinear`) owns the weight
and its packed copy and calls `linear` with both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_info import cpu_info


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A library-packed copy of a [out, in] weight: MKL's (exact `batch`) or oneDNN's."""

    kind: str  # "mkl" | "onednn"
    batch: int
    data: torch.Tensor


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack `dtype` weights (x86 builds can)."""
    if dtype == torch.float32:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    if dtype == torch.bfloat16:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and _onednn_packs_bf16()
        )
    return False


def _onednn_packs_bf16() -> bool:
    """oneDNN's bf16 weight reorder needs AVX-NE-CONVERT or AVX-512 BW/VL/DQ (AVX2-only CPUs
    such as Zen 2/3 refuse it: their bf16 linears stay on `F.linear`)."""
    flags = cpu_info()[1]
    return "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags


@torch.no_grad()
def pack_linear_weight(weight: torch.Tensor, batch: int) -> PackedWeight:
    """The packed copy of a CPU float32 or bfloat16 `weight` (see the module)."""
    dense = weight.detach().contiguous()  # NOTE: fp32 weights are stored transposed
    if weight.dtype == torch.float32:
        return PackedWeight("mkl", batch, torch.ops.mkl._mkl_reorder_linear_weight(dense, batch))
    return PackedWeight("onednn", batch, torch.ops.mkldnn._reorder_linear_weight(dense, batch))


def packed_matches_plain(weight: torch.Tensor, packed: PackedWeight) -> bool:
    """Self-check of a packed weight against `F.linear` on random rows (a bad library is off)."""
    x = torch.randn(packed.batch, weight.shape[1]).to(weight.dtype)
    expected = F.linear(x, weight).float()
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    return torch.allclose(linear(x, weight, None, packed).float(), expected, rtol=tol, atol=tol)


EXACT_ROWS = 64  # up to this many rows, oneDNN sees the step's own row count


def padded_rows(rows: int) -> int:
    """`rows` rounded up to 1/8 of its power of two above EXACT_ROWS (see the module)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
) -> torch.Tensor:
    """`F.linear` of 2-D `x`, through the packed weight where it applies (see the module)."""
    rows = x.shape[0]
    padded = padded_rows(rows)
    if padded != rows and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return linear(F.pad(x, (0, 0, 0, padded - rows)), weight, bias, packed)[:rows]
    if packed is None:
        return F.linear(x, weight, bias)
    # NOTE: the libraries read x as dense rows (lda = in_features): x must be contiguous.
    if packed.kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.data, bias, "none", [], "")
    if rows == packed.batch:
        return torch.ops.mkl._mkl_linear(x.contiguous(), packed.data, weight, bias, rows)
    if not packed.batch // 2 < rows < packed.batch:
        return F.linear(x, weight, bias)
    # Zero rows pad the batch; their outputs are computed and dropped.
    padded = F.pad(x, (0, 0, 0, packed.batch - rows))
    return torch.ops.mkl._mkl_linear(padded, packed.data, weight, bias, packed.batch)[:rows]
