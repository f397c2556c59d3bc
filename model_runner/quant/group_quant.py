"""AWQ and GPTQ tensors as read from safetensors, converted to the W4A16 layout
(`kernels.w4a16`: int32 words packed along the input features, float scales and zeros).

On disk, for a projection of N outputs and K inputs, G = K / group_size groups:

- AWQ (GEMM): `qweight` int32 [K, N / 8] packed along N in the order [0, 2, 4, 6, 1, 3, 5,
  7] (nibble i of word c holds column 8 c + order[i]); `qzeros` int32 [G, N / 8] likewise;
  `scales` [G, N]. w[n, k] = (q - z) * s of group k // group_size.
- GPTQ: `qweight` int32 [K * bits / 32, N] packed along K (our layout as stored); `qzeros`
  int32 [G, N * bits / 32] packed along N in order; `scales` [G, N]; `g_idx` [K] the group
  of each input feature (desc_act: any order). The v1 format (AutoGPTQ) stores zero - 1.

`GroupQuantTensor` is one such weight in the W4A16 layout, with its g_idx; its `shape` is
[N, K] like a float weight's, so the loader hands it to a projection shard as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant_linear import INT4_OFFSET
from kernels.w4a16 import pack_along_k, unpack_along_k, words_per_int32
from model_runner.quant.checkpoint_quant import CheckpointQuant, CheckpointQuantError
from model_runner.quant.int4_weights import GROUP_SIZE, Int4Planes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column order[i]


@dataclass(frozen=True)
class GroupQuantTensor:
    """One [N, K] weight: W4A16 words [K * bits / 32, N], scales and zeros [G, N], g_idx [K]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor  # int64 [K]
    bits: int
    group_size: int  # the effective size (K for a checkpoint's -1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[1], self.g_idx.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] in the checkpoint's input-feature order."""
        q = unpack_along_k(self.qweight, self.bits).float()
        return ((q - self.zeros.float()[self.g_idx]) * self.scales.float()[self.g_idx]).t()


def unpack_along_n(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 [R, C] packed along the columns -> [R, C * 32 / bits] int32 values."""
    per = words_per_int32(bits)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    values = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # [R, C, nibble]
    if order is not None:
        values = values[:, :, torch.argsort(torch.tensor(order))]  # nibble -> column order
    return values.reshape(packed.shape[0], -1)


def _effective_group(quant: CheckpointQuant, k: int) -> int:
    return k if quant.group_size == -1 else quant.group_size


def _check_shape(name: str, part: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise CheckpointQuantError(
            f"{name}.{part} has shape {tuple(tensor.shape)}, expected {expected} for this "
            "quantization_config"
        )


def awq_tensor(name: str, parts: dict[str, torch.Tensor], quant: CheckpointQuant):
    """An AWQ GEMM-layout projection `name` (its qweight, qzeros and scales)."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = _effective_group(quant, k)
    if k % group:
        raise CheckpointQuantError(f"{name}: {k} input features are not whole groups of {group}")
    _check_shape(name, "qzeros", qzeros, (k // group, n // 8))
    _check_shape(name, "scales", scales, (k // group, n))
    q = unpack_along_n(qweight, 4, AWQ_ORDER)
    zeros = unpack_along_n(qzeros, 4, AWQ_ORDER).to(scales.dtype)
    g_idx = torch.arange(k) // group
    return GroupQuantTensor(pack_along_k(q, 4), scales, zeros, g_idx, 4, group)


def gptq_tensor(name: str, parts: dict[str, torch.Tensor], quant: CheckpointQuant):
    """A GPTQ projection `name` (qweight, qzeros, scales and, if stored, g_idx)."""
    bits = quant.bits
    per = words_per_int32(bits)
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0] * per, qweight.shape[1]
    group = _effective_group(quant, k)
    groups = -(-k // group)
    _check_shape(name, "scales", scales, (groups, n))
    _check_shape(name, "qzeros", qzeros, (groups, n // per))
    g_idx = parts.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // group
    _check_shape(name, "g_idx", g_idx, (k,))
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CheckpointQuantError(f"{name}.g_idx names groups outside 0..{groups - 1}")
    zeros = (unpack_along_n(qzeros, bits) + quant.zero_offset).to(scales.dtype)
    return GroupQuantTensor(qweight.to(torch.int32), scales, zeros, g_idx, bits, group)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> GroupQuantTensor:
    """Round-to-nearest asymmetric quantization of a float [N, K] weight (fp16 scales): how
    `--quantization awq|gptq` fills dummy weights (the AWQ-shaped benchmark)."""
    n, k = weight.shape
    group = k if group_size == -1 or k % group_size else group_size
    w = weight.float().t().reshape(k // group, group, n)
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    top = (1 << bits) - 1
    scales = ((hi - lo) / top).clamp(min=1e-8).half()
    zeros = torch.round(-lo / scales.float()).clamp(0, top)
    q = torch.round(w / scales.float()[:, None] + zeros[:, None]).clamp(0, top)
    g_idx = torch.arange(k) // group
    qweight = pack_along_k(q.reshape(k, n).to(torch.int32), bits)
    return GroupQuantTensor(qweight, scales, zeros.half(), g_idx, bits, group)


def int4_planes(t: GroupQuantTensor) -> Int4Planes:
    """A 4-bit weight with groups in order as the CPU kernels' planes (groups of 32).

    NOTE: exact: w = (q - z) s = (q - 8) s + (8 - z) s, and (8 - z) s of a small integer and
    an fp16 scale is exact in float32 (the int8-dot kernels keep float32 scales and zeros).
    """
    k = t.g_idx.shape[0]
    assert t.bits == 4 and t.group_size % GROUP_SIZE == 0
    if not torch.equal(t.g_idx, torch.arange(k) // t.group_size):
        raise CheckpointQuantError("a g_idx out of group order with desc_act false")
    repeat = t.group_size // GROUP_SIZE
    scales = t.scales.float().t().repeat_interleave(repeat, dim=1)
    zeros = (INT4_OFFSET - t.zeros.float().t().repeat_interleave(repeat, dim=1)) * scales
    q = unpack_along_k(t.qweight, 4).t().to(torch.uint8).contiguous()
    return Int4Planes(q, scales.contiguous(), zeros.contiguous(), 1)
