"""`kernels.linear`: packed CPU weights give F.linear's products at every row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import (
    PackedWeight,
    linear,
    pack_linear_weight,
    packed_matches_plain,
    packing_available,
    padded_rows,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _packed(dtype: torch.dtype, batch: int = 16) -> tuple[torch.Tensor, PackedWeight]:
    if not packing_available(dtype):
        pytest.skip(f"this torch build packs no {dtype} weights")
    torch.manual_seed(0)
    weight = (torch.randn(96, 64) * 0.1).to(dtype)
    return weight, pack_linear_weight(weight, batch)


@pytest.mark.parametrize(("dtype", "kind"), [(torch.float32, "mkl"), (torch.bfloat16, "onednn")])
def test_packing_names_the_library_and_batch(dtype, kind):
    weight, packed = _packed(dtype)
    assert isinstance(packed, PackedWeight)
    assert (packed.kind, packed.batch) == (kind, 16)
    assert packed_matches_plain(weight, packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 9, 15, 16, 17, 40])
def test_linear_equals_f_linear_at_every_row_count(dtype, rows):
    weight, packed = _packed(dtype)
    x = torch.randn(rows, 64).to(dtype)
    bias = torch.randn(96).to(dtype)
    out = linear(x, weight, bias, packed)
    assert out.shape == (rows, 96) and out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_rows_are_read_densely(dtype):
    weight, packed = _packed(dtype)
    x = torch.randn(16, 128).to(dtype)[:, ::2]  # strided: read as dense rows it would be wrong
    tol = TOL[dtype]
    torch.testing.assert_close(
        linear(x, weight, None, packed), F.linear(x, weight), rtol=tol, atol=tol
    )


def test_mkl_packed_path_is_taken_only_between_half_and_full_batch(monkeypatch):
    weight, packed = _packed(torch.float32)
    calls = []
    real = torch.ops.mkl._mkl_linear

    class Spy:
        @staticmethod
        def _mkl_linear(*args):
            calls.append(args[0].shape[0])
            return real(*args)

    monkeypatch.setattr(torch.ops, "mkl", Spy)
    for rows in (4, 8, 9, 16, 17):
        linear(torch.randn(rows, 64), weight, None, packed)
    assert calls == [16, 16]  # 9 rows padded to 16, then 16; 4, 8 and 17 take F.linear


def test_plain_weights_take_f_linear():
    weight = torch.randn(32, 8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))


def test_bf16_rows_are_padded_to_few_sizes():
    """oneDNN caches a primitive per shape: above 64 rows only ~8 sizes per power of two."""
    assert [padded_rows(r) for r in (1, 64, 65, 72, 127, 129, 2047)] == [1, 64, 72, 72, 128, 144,
                                                                         2048]  # fmt: skip
    sizes = {padded_rows(r) for r in range(1, 2049)}
    assert len(sizes) <= 110 and all(padded_rows(r) - r <= r / 8 for r in range(1, 2049))


@pytest.mark.parametrize("packed_too", [False, True])
def test_padded_bf16_products_equal_f_linear(packed_too):
    weight, packed = _packed(torch.bfloat16)
    x = torch.randn(100, 64).to(torch.bfloat16)
    out = linear(x, weight, None, packed if packed_too else None)
    assert out.shape == (100, 96)
    torch.testing.assert_close(out.float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2)
