"""Weight-only 4-bit (or 8-bit) GEMM with group-wise scales and zero points: the torch
reference of `kernels.w4a16_triton`, and the packing both read.

The packed layout is GPTQ's on-disk `qweight`: int32 [K * bits / 32, N], element (k, n) in
bits [(k % per) * bits, + bits) of word [k // per, n], per = 32 / bits (8 for 4-bit). Groups
of `group_size` consecutive input features share a scale and a zero point per column:
w[n, k] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n], with scales
and zeros [K / group_size, N] floats (the zero point as a float, so no packing). AWQ and
GPTQ checkpoints are converted to this layout at load (`model_runner.quant.group_quant`).
"""

from __future__ import annotations

import torch

BITS_SUPPORTED = (4, 8)


def words_per_int32(bits: int) -> int:
    return 32 // bits


def pack_along_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] (integers in 0..2^bits - 1) -> int32 [K * bits / 32, N] (see the module)."""
    per = words_per_int32(bits)
    k, n = q.shape
    assert k % per == 0, f"K={k} is not a multiple of {per}"
    parts = q.to(torch.int64).reshape(k // per, per, n)
    shifts = (torch.arange(per, dtype=torch.int64, device=q.device) * bits).view(1, per, 1)
    words = (parts << shifts).sum(dim=1)
    # NOTE: the top nibble makes some words >= 2^31: wrap them to int32 two's complement.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_along_k(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K * bits / 32, N] -> q [K, N] int32 (the inverse of `pack_along_k`)."""
    per = words_per_int32(bits)
    rows, n = qweight.shape
    shifts = (torch.arange(per, dtype=torch.int32, device=qweight.device) * bits).view(1, per, 1)
    q = (qweight[:, None, :] >> shifts) & ((1 << bits) - 1)
    return q.reshape(rows * per, n)


def w4a16_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """The float32 weight [K, N] (input features first, as the GEMM reads it)."""
    q = unpack_along_k(qweight, bits).float()
    s = scales.float().repeat_interleave(group_size, dim=0)[: q.shape[0]]
    z = zeros.float().repeat_interleave(group_size, dim=0)[: q.shape[0]]
    return (q - z) * s


def w4a16_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> torch.Tensor:
    """x [M, K] @ w -> [M, N] in x's dtype: dequantize, fp32 GEMM (as the kernel: fp32
    accumulation of the weight in x's dtype)."""
    weight = w4a16_dequantize(qweight, scales, zeros, group_size, bits).to(x.dtype)
    return (x.float() @ weight.float()).to(x.dtype)
