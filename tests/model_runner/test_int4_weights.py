"""GGUF Q4_0/Q4_1/Q8_0 blocks and float weights as the 4-bit GEMM's planes.

The kernel takes bfloat16 scales and zeros, so a GGUF fp16 scale loses its 3 lowest
mantissa bits. The stated tolerance, checked per weight against gguf's own dequantization:
Q4_0/Q4_1 |w' - w| <= 2^-8 * (8 |scale| + |zero|) (bf16's half ulp on each), Q8_0 (two
planes, w' = bf16(d) * q exactly) |w' - w| <= 2^-8 |w|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quantize

from kernels.quant_linear import int4_dequantize, int4_linear, int4_linear_ref, int4_pack
from model_runner.gguf_loader import GGUFBlocks, unpermute_rotary
from model_runner.quant.int4_weights import (
    GROUP_SIZE,
    from_gguf_blocks,
    quantize_int4,
    quantize_int8,
)

HALF_ULP = 2.0**-8  # bf16 keeps 8 significant bits: its unit roundoff


def _blocks(
    kind: str, rows: int = 48, cols: int = 96, seed: int = 0
) -> tuple[GGUFBlocks, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.02, 0.02, (rows, 1))
    qtype = GGMLQuantizationType[kind]
    blocks = GGUFBlocks(qtype, quantize(weights.astype(np.float32), qtype))
    return blocks, blocks.dequantize()


def _effective(planes) -> torch.Tensor:
    """The weight the kernel multiplies by (both planes summed for 8-bit formats)."""
    w = int4_dequantize(planes.q, planes.scales_zeros(torch.bfloat16), GROUP_SIZE)
    if planes.planes == 2:
        k = w.shape[1] // 2
        w = w[:, :k] + w[:, k:]
    return w


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_4bit_gguf_blocks_within_bf16_scale_precision(kind):
    blocks, reference = _blocks(kind)
    planes = from_gguf_blocks(blocks)
    assert planes.planes == 1 and planes.shape == blocks.shape == reference.shape
    assert planes.q.dtype == torch.uint8 and int(planes.q.max()) <= 15
    scale = planes.scales.repeat_interleave(GROUP_SIZE, dim=1)
    zero = planes.zeros.repeat_interleave(GROUP_SIZE, dim=1)
    bound = HALF_ULP * (8 * scale.abs() + zero.abs()) + 1e-7
    error = (_effective(planes) - torch.from_numpy(reference)).abs()
    assert bool((error <= bound).all()), float((error - bound).max())
    assert float(error.max()) > 0  # bf16 scales do lose bits: the bound is not vacuous


def test_q8_0_blocks_become_two_exact_planes():
    blocks, reference = _blocks("Q8_0")
    planes = from_gguf_blocks(blocks)
    assert planes.planes == 2 and planes.q.shape == (48, 2 * 96)
    ref = torch.from_numpy(reference)
    error = (_effective(planes) - ref).abs()
    assert bool((error <= HALF_ULP * ref.abs() + 1e-9).all())


def test_unpermuted_rows_keep_their_blocks():
    blocks, reference = _blocks("Q4_1", rows=64, cols=64)
    permuted = unpermute_rotary(blocks, num_heads=2)
    assert isinstance(permuted, GGUFBlocks)
    np.testing.assert_array_equal(permuted.dequantize(), unpermute_rotary(reference, 2))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_kernel_matches_its_reference_on_converted_blocks(kind):
    blocks, reference = _blocks(kind)
    planes = from_gguf_blocks(blocks)
    sz = planes.scales_zeros(torch.bfloat16)
    x = torch.randn(5, 96).bfloat16()
    xin = torch.cat([x, x], dim=1) if planes.planes == 2 else x
    got = int4_linear(xin, int4_pack(planes.q), sz, GROUP_SIZE).float()
    ref = int4_linear_ref(xin, planes.q, sz, GROUP_SIZE).float()
    exact = x.float() @ torch.from_numpy(reference).t()
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)  # bf16 outputs
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=2e-2)


def test_int4_from_float_is_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(32, 128) * 0.1
    planes = quantize_int4(weight)
    assert planes.planes == 1
    step = planes.scales.repeat_interleave(GROUP_SIZE, dim=1)
    zero = planes.zeros.repeat_interleave(GROUP_SIZE, dim=1)
    error = (_effective(planes) - weight).abs()
    assert bool((error <= step / 2 + HALF_ULP * zero.abs() + 1e-6).all())


def test_int8_from_float_is_within_half_a_step():
    torch.manual_seed(1)
    weight = torch.randn(32, 128) * 0.1
    planes = quantize_int8(weight)
    assert planes.planes == 2
    step = planes.scales[:, planes.scales.shape[1] // 2 :].repeat_interleave(GROUP_SIZE, dim=1)
    error = (_effective(planes) - weight).abs()
    assert bool((error <= step / 2 + 1e-6).all())
    assert float(error.max()) < float(quantize_int4(weight).scales.min())  # finer than 4-bit


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_in_the_int8_dot_layouts_are_exact(kind):
    """The int8-dot kernels keep GGUF's fp16 scales: their weights are gguf's own, bit for
    bit (their tolerance is the float32 rounding of d * q + m alone)."""
    from kernels import int8_dot_linear
    from model_runner.quant.int4_weights import q4_values, q8_values

    blocks, reference = _blocks(kind)
    planes = from_gguf_blocks(blocks)
    if kind == "Q8_0":
        q, d = int8_dot_linear.unpack_q8(*int8_dot_linear.pack_q8(*q8_values(planes)))
        w = q.float() * d.repeat_interleave(GROUP_SIZE, dim=1)
    else:
        q, d, m = int8_dot_linear.unpack_q4(*int8_dot_linear.pack_q4(*q4_values(planes)))
        w = q.float() * d.repeat_interleave(GROUP_SIZE, 1) + m.repeat_interleave(GROUP_SIZE, 1)
    torch.testing.assert_close(w, torch.from_numpy(reference), rtol=1e-6, atol=1e-7)
