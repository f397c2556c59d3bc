"""`kernels.linear`: MKL-packed float32 weights give F.linear's products at every row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import (
    PACKED_ATTR,
    PackedWeight,
    linear,
    mkl_packing_available,
    pack_linear_weight,
    packed_matches_plain,
)

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL")


@pytest.fixture
def packed_weight() -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64) * 0.1, requires_grad=False)
    pack_linear_weight(weight, 16)
    return weight


def test_packing_attaches_the_batch_it_was_packed_for(packed_weight):
    packed = getattr(packed_weight, PACKED_ATTR)
    assert isinstance(packed, PackedWeight) and packed.batch == 16
    assert packed_matches_plain(packed_weight)


@pytest.mark.parametrize("rows", [1, 8, 9, 15, 16, 17, 40])
def test_linear_equals_f_linear_at_every_row_count(packed_weight, rows):
    x = torch.randn(rows, 64)
    bias = torch.randn(96)
    out = linear(x, packed_weight, bias)
    assert out.shape == (rows, 96)
    torch.testing.assert_close(out, F.linear(x, packed_weight, bias), rtol=1e-5, atol=1e-5)


def test_non_contiguous_rows_are_read_densely(packed_weight):
    wide = torch.randn(16, 128)
    x = wide[:, ::2]  # a strided view: MKL would misread it as dense rows
    torch.testing.assert_close(linear(x, packed_weight), F.linear(x, packed_weight))


def test_packed_path_is_taken_only_between_half_and_full_batch(packed_weight, monkeypatch):
    calls = []
    real = torch.ops.mkl._mkl_linear

    class Spy:
        @staticmethod
        def _mkl_linear(*args):
            calls.append(args[0].shape[0])
            return real(*args)

    monkeypatch.setattr(torch.ops, "mkl", Spy)
    for rows in (4, 8, 9, 16, 17):
        linear(torch.randn(rows, 64), packed_weight)
    assert calls == [16, 16]  # 9 rows padded to 16, then 16; 4, 8 and 17 take F.linear


def test_plain_weights_take_f_linear():
    weight = torch.randn(32, 8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
