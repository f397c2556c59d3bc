"""Weight-only 4-bit GEMM with group-wise scales and zero points, beside its torch reference.

A weight [N, K] is stored as unsigned 4-bit values q in [0, 15] and, per group of
`group_size` consecutive input features, a scale s and a zero z (torch's "tinygemm"
convention): w = (q - 8) * s + z. `scales_zeros` is [K / group_size, N, 2] in the
activations' dtype. The kernel is torch's own CPU int4 GEMM
(`_weight_int4pack_mm_for_cpu`), which dequantizes in registers and accumulates in fp32.

NOTE: it is fast only with bfloat16 activations (measured on a Zen 4 CPU: 0.05 ms for a
[1 x 576] x [576 x 3072] product, 1.6 ms with float32 or float16 activations), so the
quantized linear methods run it in bfloat16 and the server warns about other dtypes.
The kernel layout is opaque; the reference takes the unpacked q [N, K] in its place.
"""

from __future__ import annotations

import torch

INT4_OFFSET = 8  # w = (q - INT4_OFFSET) * scale + zero


def int4_kernel_available(device: torch.device) -> bool:
    """Whether this torch build has the int4 GEMM for `device` (CPU builds do)."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """The kernel layout of 4-bit values q [N, K] (any integer dtype, values 0..15)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] @ w.T for the packed 4-bit weight; [M, N] in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), packed, group_size, scales_zeros
    )


def int4_linear_planes(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    planes: int,
) -> torch.Tensor:
    """`int4_linear` of a weight stored as `planes` (1 or 2) 4-bit planes side by side along
    K: with two, x is repeated so that each plane meets the same inputs (w = high + low)."""
    if planes == 2:
        x = torch.cat([x, x], dim=1)
    return int4_linear(x, packed, scales_zeros, group_size)


def int4_dequantize(q: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] that q [N, K] and its scales and zeros stand for."""
    scales = scales_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zeros = scales_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - INT4_OFFSET) * scales + zeros


def int4_linear_ref(
    x: torch.Tensor, q: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Torch reference of `int4_linear`: dequantize, fp32 GEMM, back to x's dtype."""
    weight = int4_dequantize(q, scales_zeros, group_size)
    return (x.float() @ weight.t()).to(x.dtype)
