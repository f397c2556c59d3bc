"""`kernels.int8_dot_linear`: layouts that round-trip, kernels equal to their references, and
activations quantized as finely as documented."""

from __future__ import annotations

import pytest
import torch

from kernels import int8_dot_linear as k
from tests.conftest import needs_int8_dot

GEN = torch.Generator().manual_seed(0)


def _q4(n: int, cols: int):
    d = torch.rand(n, cols // k.BLOCK, generator=GEN) / 16
    m = -torch.rand(n, cols // k.BLOCK, generator=GEN)
    return torch.randint(0, 16, (n, cols), generator=GEN), d, m


def _q8(n: int, cols: int):
    return torch.randint(-128, 128, (n, cols), generator=GEN), torch.rand(n, cols // 32) / 64


def test_q4_and_q8_layouts_round_trip_exactly():
    q, d, m = _q4(48, 96)
    uq, ud, um = k.unpack_q4(*k.pack_q4(q, d, m))
    assert torch.equal(uq.long(), q)
    assert torch.equal(ud, d.half().float()) and torch.equal(um, m.half().float())  # fp16 scales
    q8, d8 = _q8(32, 64)
    uq8, ud8 = k.unpack_q8(*k.pack_q8(q8, d8))
    assert torch.equal(uq8.long(), q8) and torch.equal(ud8, d8.half().float())


def test_activations_keep_about_15_bits_of_each_blocks_largest():
    x = torch.randn(4, 256, generator=GEN) * torch.logspace(-3, 2, 256)
    q, d = k.quantize_activations(x)
    error = (q * d.double()[..., None]).reshape(4, 256) - x.double()
    largest = x.view(4, -1, k.BLOCK).abs().amax(-1).double()
    assert bool((error.view(4, -1, k.BLOCK).abs() <= largest[..., None] / (127 * 254)).all())


@needs_int8_dot
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["q4", "q8"])
def test_kernels_equal_their_references(rows, dtype, layout):
    n, cols = 64, 160
    packed = k.pack_q4(*_q4(n, cols)) if layout == "q4" else k.pack_q8(*_q8(n, cols))
    kernel, ref = {"q4": (k.q4_linear, k.q4_linear_ref), "q8": (k.q8_linear, k.q8_linear_ref)}[
        layout
    ]
    x = torch.randn(rows, cols, generator=GEN).to(dtype)
    out, expected = kernel(x, *packed), ref(x, *packed)
    assert out.dtype == dtype and out.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    exact = kernel(x, *packed, True)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, ref(x, *packed, True), rtol=1e-5, atol=1e-4)


@needs_int8_dot
def test_a_rows_result_does_not_depend_on_the_others():
    packed = k.pack_q4(*_q4(64, 96))
    x = torch.randn(11, 96, generator=GEN).bfloat16()
    alone = torch.cat([k.q4_linear(x[i : i + 1], *packed) for i in range(11)])
    assert torch.equal(k.q4_linear(x, *packed), alone)


@needs_int8_dot
def test_strided_inputs_are_accepted():
    packed = k.pack_q8(*_q8(32, 64))
    x = torch.randn(5, 128, generator=GEN)[:, :64]
    assert not x.is_contiguous()
    torch.testing.assert_close(k.q8_linear(x, *packed), k.q8_linear_ref(x, *packed))


def test_fits_needs_whole_tiles_and_blocks():
    assert k.fits(960, 576) and not k.fits(100, 576) and not k.fits(96, 50)
