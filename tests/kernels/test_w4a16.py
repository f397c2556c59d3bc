"""The W4A16 GEMM: packing round trips, the torch reference against a float64 dequantized
product, the Triton kernel against the reference (interpreted on the CPU) on random shapes,
bit widths and group sizes; the FP8 GEMM (`torch._scaled_mm`) against its reference."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.fp8_linear import FP8, fp8_linear, fp8_linear_ref, fp8_quantize_rows
from kernels.w4a16 import pack_along_k, unpack_along_k, w4a16_linear_ref
from kernels.w4a16_triton import w4a16_linear_triton
from tests.kernels.helpers import assert_close, randn

# (rows M, inputs K, outputs N, group size, bits): decode rows, prefill rows, ragged N,
# one group over all of K (GPTQ's -1), 8-bit GPTQ.
SHAPES = [(1, 64, 40, 32, 4), (19, 128, 72, 64, 4), (3, 96, 24, 96, 4), (5, 64, 48, 32, 8),
          (33, 256, 136, 128, 4)]  # fmt: skip


def weights(k, n, group, bits, gen, device):
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.05 + 0.01
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=gen).float()
    return q, pack_along_k(q, bits).to(device), scales, zeros


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips(bits):
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (64, 24), generator=gen)
    packed = pack_along_k(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_along_k(packed, bits), q.int())
    # NOTE: element k of column n sits at bits (k % per) * bits of word k // per
    per = 32 // bits
    word = int(packed[1, 5]) & 0xFFFFFFFF
    assert (word >> (3 * bits)) & (2**bits - 1) == int(q[per + 3, 5])


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_a_float64_product(shape):
    m, k, n, group, bits = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, packed, scales, zeros = weights(k, n, group, bits, gen, "cpu")
    x = randn(m, k, dtype=torch.float32, device="cpu", gen=gen)
    dense = (q.double() - zeros.double().repeat_interleave(group, 0)) * scales.double(
    ).repeat_interleave(group, 0)  # fmt: skip
    assert_close(w4a16_linear_ref(x, packed, scales, zeros, group, bits).double(),
                 x.double() @ dense, torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_the_reference(shape, dtype, device):
    m, k, n, group, bits = shape
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    _, packed, scales, zeros = weights(k, n, group, bits, gen, device)
    scales, zeros = scales.to(device, dtype), zeros.to(device, dtype)
    x = randn(m, k, dtype=dtype, device=device, gen=gen)
    want = w4a16_linear_ref(x, packed, scales, zeros, group, bits)
    got = w4a16_linear_triton(x, packed, scales, zeros, group, bits)
    assert_close(got, want, dtype)


def test_ops_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    _, packed, scales, zeros = weights(64, 16, 32, 4, gen, "cpu")
    x = randn(2, 64, dtype=torch.float32, device="cpu", gen=gen)
    want = w4a16_linear_ref(x, packed, scales, zeros, 32)
    assert torch.equal(ops.w4a16_linear(x, packed, scales, zeros, 32), want)
    monkeypatch.setenv("TOKENMILL_KERNELS", "triton")
    assert_close(ops.w4a16_linear(x, packed, scales, zeros, 32), want, torch.float32)


def test_triton_refuses_groups_its_k_step_splits():
    x = torch.zeros(1, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a16_linear_triton(x, torch.zeros(6, 8, dtype=torch.int32), torch.ones(3, 8),
                            torch.zeros(3, 8), 16)  # fmt: skip


@pytest.mark.parametrize("static", [False, True])
def test_fp8_scaled_mm_matches_its_reference(static):
    """torch._scaled_mm runs on the CPU too: the GPU path's exact FP8 operands and scales."""
    gen = torch.Generator().manual_seed(int(static))
    x = randn(5, 64, dtype=torch.float32, device="cpu", gen=gen)
    w, w_scale = fp8_quantize_rows(randn(48, 64, dtype=torch.float32, device="cpu", gen=gen))
    assert w.dtype == FP8
    input_scale = torch.tensor(0.02) if static else None
    want = fp8_linear_ref(x, w, w_scale.reshape(-1), input_scale)
    got = fp8_linear(x, w, w_scale.reshape(-1), input_scale)
    assert_close(got, want, torch.float32)
    # FP8's 3 mantissa bits: within a few percent of the unquantized product
    exact = x @ (w.float() * w_scale).t()
    assert (got - exact).norm() / exact.norm() < 0.05
