"""Triton RMSNorm and fused residual-add + RMSNorm vs the torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.layernorm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.layernorm_triton import fused_add_rms_norm_triton, rms_norm_triton
from tests.kernels.helpers import assert_close, assert_rounded_equal, poison_like, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 1024])
def test_rms_norm(dtype, hidden, device):
    gen = torch.Generator().manual_seed(hidden)
    x = randn(7, hidden, dtype=dtype, device=device, gen=gen, scale=3.0)
    weight = randn(hidden, dtype=dtype, device=device, gen=gen)
    out = poison_like(x)
    got = rms_norm_triton(x, weight, 1e-5, out=out)
    assert got is out
    assert_close(got, rms_norm_ref(x, weight, 1e-5), dtype)


def test_rms_norm_3d_input_allocates_output(device):
    gen = torch.Generator().manual_seed(2)
    x = randn(2, 3, 96, dtype=torch.float32, device=device, gen=gen)
    weight = randn(96, dtype=torch.float32, device=device, gen=gen)
    assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 1024])
def test_fused_add_rms_norm_writes_both_outputs(dtype, hidden, device):
    gen = torch.Generator().manual_seed(hidden + 1)
    x = randn(9, hidden, dtype=dtype, device=device, gen=gen)
    residual = randn(9, hidden, dtype=dtype, device=device, gen=gen, scale=4.0)
    weight = randn(hidden, dtype=dtype, device=device, gen=gen)
    out = (poison_like(x), poison_like(x))
    normed, summed = fused_add_rms_norm_triton(x, residual, weight, 1e-5, out=out)
    assert normed is out[0] and summed is out[1]
    want_normed, want_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_rounded_equal(summed, want_summed, dtype)
    assert_close(normed, want_normed, dtype)


def test_fused_add_rms_norm_in_place(device):
    gen = torch.Generator().manual_seed(3)
    x = randn(4, 256, dtype=torch.bfloat16, device=device, gen=gen)
    residual = randn(4, 256, dtype=torch.bfloat16, device=device, gen=gen)
    weight = randn(256, dtype=torch.bfloat16, device=device, gen=gen)
    want_normed, want_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    fused_add_rms_norm_triton(x, residual, weight, 1e-5, out=(x, residual))
    assert_rounded_equal(residual, want_summed, torch.bfloat16)
    assert_close(x, want_normed, torch.bfloat16)
