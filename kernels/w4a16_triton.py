"""Triton W4A16 GEMM: x [M, K] (bf16/fp16/fp32) times a packed 4-bit (or 8-bit) weight.

One program per [BLOCK_M, BLOCK_N] output tile; each K step loads a [BLOCK_K / per, BLOCK_N]
slab of int32 words once per 8 rows (the layout of `kernels.w4a16`), shifts the 4-bit values
out in registers, dequantizes them against their group's scale and zero point in fp32 and
feeds `tl.dot` in x's dtype with fp32 accumulation. NOTE: BLOCK_K divides `group_size`
(the launcher checks), so a K step reads one scale row and one zero row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 32  # divides every supported group size (32, 64, 128, ...)


def tile_config(m: int) -> dict:
    """Block sizes by row count: decode steps (M <= 16) one 16-row tile and narrow columns
    (N / 32 programs, so a 4096-wide projection fills an H100's 132 SMs), prefill larger.
    NOTE: not tuned on a GPU yet; no split-K."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, stride_xm,
                  stride_qk, stride_sg, stride_om, group_size, BITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    per: tl.constexpr = 32 // BITS
    mask_bits: tl.constexpr = (1 << BITS) - 1
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    shifts = ((offs_k % per) * BITS)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        words = tl.load(qw_ptr + (k // per)[:, None].to(tl.int64) * stride_qk + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0)  # fmt: skip
        q = (words >> shifts) & mask_bits
        g = k0 // group_size
        s = tl.load(scales_ptr + g * stride_sg + cols, mask=col_ok, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g * stride_sg + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z[None, :]) * s[None, :]).to(x.dtype)
        if UPCAST:  # NOTE: the CPU interpreter multiplies bf16 as raw bits; upcast (exact)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def w4a16_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> torch.Tensor:
    """Triton `kernels.w4a16.w4a16_linear_ref` (x's last dim contiguous)."""
    m, k = x.shape
    n = qweight.shape[1]
    if group_size % BLOCK_K:
        raise ValueError(f"group_size {group_size} is not a multiple of {BLOCK_K}")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = tile_config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), group_size, BITS=bits, DOT_PRECISION=precision,
        UPCAST=x.dtype == torch.bfloat16 and not x.is_cuda, **cfg,
    )  # fmt: skip
    return out
