"""4-bit planes for the int4 GEMM (`kernels.quant_linear`), from GGUF blocks or float weights.

Every quantized format here becomes `Int4Planes`: 4-bit values q [N, planes * K] in 0..15,
with a float32 scale and zero per group of 32 input features, w = (q - 8) * scale + zero.

- GGUF Q4_1 (w = d * q + m):  scale d, zero m + 8 d.
- GGUF Q4_0 (w = d * (q - 8)): scale d, zero 0.
- GGUF Q8_0 (w = d * q, q int8) and `int8`: two planes, exact. q = 16 * hi + lo with
  hi = q >> 4 in [-8, 7] and lo = q & 15, so w = (16 d) * hi + d * lo: plane 1 holds hi + 8
  with scale 16 d and zero 0, plane 2 holds lo with scale d and zero 8 d, and the kernel reads
  the input twice ([x | x], K doubled), summing both planes in one fp32 accumulation.
- `int4` from float weights: asymmetric min-max per group of 32 (as llama.cpp's Q4_1).

NOTE: the kernel takes bfloat16 scales and zeros, so each GGUF fp16 scale loses its 3 lowest
mantissa bits: a weight is exact to within 2^-8 * (8 |scale| + |zero|) (bf16's half ulp
on each). Float weights are quantized against the bf16-rounded scale and zero, so the
rounding is part of the quantization error, not added to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from kernels.quant_linear import INT4_OFFSET
from model_runner.gguf_loader import GGUFBlocks

GROUP_SIZE = 32  # the GGUF block size, and the quantization group of int4/int8 at load
GGUF_INT4_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF types served natively as 4-bit planes


@dataclass(frozen=True)
class Int4Planes:
    """A [N, K] weight as 4-bit values with group-wise scales and zeros (see the module)."""

    q: torch.Tensor  # [N, planes * K] uint8 in 0..15
    scales: torch.Tensor  # [N, planes * K / GROUP_SIZE] float32
    zeros: torch.Tensor  # same shape
    planes: int  # 1 (4-bit formats) or 2 (8-bit formats: high plane, then low plane)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] // self.planes

    def scales_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's [planes * K / GROUP_SIZE, N, 2] table in `dtype`."""
        return torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(dtype).contiguous()


def q4_values(planes: Int4Planes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 1-plane weight as (q, d, m) with w = d * q + m: the int8-dot kernels' q4 format."""
    assert planes.planes == 1
    return planes.q, planes.scales, planes.zeros - INT4_OFFSET * planes.scales


def q8_values(planes: Int4Planes) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-plane weight as its 8-bit values and scales (q, d), w = d * q: the q8 format."""
    assert planes.planes == 2
    k = planes.q.shape[1] // 2
    hi, lo = planes.q[:, :k].to(torch.int16), planes.q[:, k:].to(torch.int16)
    return 16 * (hi - INT4_OFFSET) + lo, planes.scales[:, planes.scales.shape[1] // 2 :]


def concat_rows(parts: list[Int4Planes]) -> Int4Planes:
    """Stack shards (q, k, v or gate, up) of one fused projection along the output rows."""
    if len(parts) == 1:
        return parts[0]
    assert len({p.planes for p in parts}) == 1
    return Int4Planes(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        parts[0].planes,
    )


# --- GGUF blocks ------------------------------------------------------------------------


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of every block, as float32 [rows, blocks]."""
    return (
        np.ascontiguousarray(blocks[..., start : start + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit packing: byte j holds element j (low nibble) and j + 16 (high nibble)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf_blocks(blocks: GGUFBlocks) -> Int4Planes:
    """The 4-bit planes of a Q4_0, Q4_1 or Q8_0 tensor (exact up to bf16 scales)."""
    rows, cols = blocks.shape
    kind = blocks.type_name
    block_bytes = GGML_QUANT_SIZES[blocks.qtype][1]
    raw = blocks.data.reshape(rows, cols // GROUP_SIZE, block_bytes)
    d = _fp16(raw, 0)
    if kind == "Q8_0":
        q = np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(rows, cols)
        return _two_planes(torch.from_numpy(q.astype(np.int16)), torch.from_numpy(d))
    if kind == "Q4_1":
        m = _fp16(raw, 2)
        q, zeros = _nibbles(raw[..., 4:]), m + INT4_OFFSET * d
    else:
        q, zeros = _nibbles(raw[..., 2:]), np.zeros_like(d)
    return Int4Planes(
        torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d), torch.from_numpy(zeros), 1
    )


def _two_planes(q: torch.Tensor, d: torch.Tensor) -> Int4Planes:
    """8-bit values q [N, K] (int, -128..127) with scales d [N, K / 32] as two 4-bit planes."""
    hi, lo = (q >> 4) + INT4_OFFSET, q & 0x0F
    return Int4Planes(
        torch.cat([hi, lo], dim=1).to(torch.uint8),
        torch.cat([16 * d, d], dim=1),
        torch.cat([torch.zeros_like(d), INT4_OFFSET * d], dim=1),
        2,
    )


# --- float weights (--quantization int4 / int8) -----------------------------------------


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def quantize_int4(weight: torch.Tensor) -> Int4Planes:
    """Asymmetric 4-bit quantization per group of 32: scale (max - min) / 15, zero near min."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = _bf16((hi - lo) / 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = _bf16(lo + INT4_OFFSET * scale)
    q = torch.round((w - zero[..., None]) / scale[..., None]) + INT4_OFFSET
    q = q.clamp_(0, 15).to(torch.uint8).reshape(rows, cols)
    return Int4Planes(q, scale, zero, 1)


def quantize_int8(weight: torch.Tensor) -> Int4Planes:
    """Symmetric 8-bit quantization per group of 32 (as GGUF Q8_0), served as two planes."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    scale = _bf16(w.abs().amax(dim=-1) / 127)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[..., None]).clamp_(-128, 127).to(torch.int16)
    return _two_planes(q.reshape(rows, cols), scale)
