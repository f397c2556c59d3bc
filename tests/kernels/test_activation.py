"""Triton SiLU-and-mul vs the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul_ref
from kernels.activation_triton import silu_and_mul_triton
from tests.kernels.helpers import assert_close, poison_like, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 1536), (2, 3, 2 * 200), (1, 2 * 3000)])
def test_silu_and_mul(dtype, shape, device):
    gen = torch.Generator().manual_seed(shape[-1])
    x = randn(*shape, dtype=dtype, device=device, gen=gen, scale=4.0)
    out = poison_like(x[..., : shape[-1] // 2])
    got = silu_and_mul_triton(x, out=out)
    assert got is out
    assert_close(got, silu_and_mul_ref(x), dtype)
