"""`kernels.cpu_decode_layer`: the fused C++ decoder layer against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import int8_dot_linear as k
from kernels.cpu_decode_layer import (
    LAYOUT_CODES,
    LayerWeights,
    Shape,
    StepTensors,
    decode_layer,
    decode_layer_ref,
)
from tests.conftest import needs_int8_dot

pytestmark = needs_int8_dot
H, HEADS, KV_HEADS, D, INTER = 128, 4, 2, 32, 96


def _weight(layout: str, n: int, cols: int, gen: torch.Generator):
    d = torch.rand(n, cols // k.BLOCK, generator=gen) / 20
    if layout == "q4":
        return k.pack_q4(torch.randint(0, 16, (n, cols), generator=gen), d, -8 * d)
    return k.pack_q8(torch.randint(-128, 128, (n, cols), generator=gen), d / 16)


def _layer(layouts: tuple[str, ...], bias: bool, gen: torch.Generator) -> LayerWeights:
    qkv = HEADS * D + 2 * KV_HEADS * D
    shapes = [(qkv, H), (H, HEADS * D), (2 * INTER, H), (H, INTER)]
    return LayerWeights(
        torch.rand(H, generator=gen) + 0.5,
        torch.rand(H, generator=gen) + 0.5,
        tuple(_weight(lay, n, c, gen) for lay, (n, c) in zip(layouts, shapes, strict=True)),
        tuple(LAYOUT_CODES[lay] for lay in layouts),
        torch.randn(qkv, generator=gen) * 0.1 if bias else None,
    )


def _step(lens: list[int], slots: list[int], gen: torch.Generator, buffer_rows=None):
    angles = torch.rand(len(lens), D // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    rows = torch.arange(len(lens)) if buffer_rows is None else torch.tensor(buffer_rows)
    return StepTensors(torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1),
                       torch.tensor(lens), torch.tensor(slots), rows)  # fmt: skip


@pytest.mark.parametrize("layouts", [("q4",) * 4, ("q8", "q4", "q8", "q8")])
@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_the_layer_equals_its_reference(layouts, window, bias):
    gen = torch.Generator().manual_seed(0)
    weights = _layer(layouts, bias, gen)
    lens = [5, 40, 17, 1]
    step = _step(lens, [3, -1, 10, 0], gen)  # -1: no paged-cache slot (padding)
    shape = Shape(HEADS, KV_HEADS, 1e-5, D**-0.5, window)
    residual = torch.randn(len(lens), H, generator=gen)
    k_buf, v_buf = (torch.randn(5, 48, KV_HEADS, D, generator=gen).bfloat16() for _ in "kv")
    k_cache, v_cache = (torch.zeros(4, 4, KV_HEADS, D, dtype=torch.bfloat16) for _ in "kv")
    ours = [t.clone() for t in (residual, k_buf, v_buf, k_cache, v_cache)]
    ref = [t.clone() for t in (residual, k_buf, v_buf, k_cache, v_cache)]
    decode_layer(ours[0], weights, step, *ours[1:], shape)
    decode_layer_ref(ref[0], weights, step, *ref[1:], shape)
    update = (ref[0] - residual).norm()
    assert update > 0.1 * residual.norm()  # the layer did change the residual stream
    assert (ours[0] - ref[0]).norm() < 1e-3 * update
    for got, expected in zip(ours[1:], ref[1:], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert torch.count_nonzero(ours[3].view(-1, KV_HEADS * D).abs().sum(-1)) == 3  # 3 slots


def test_long_contexts_split_over_threads_agree():
    """Enough attention work for the kernel to spread rows and heads over threads."""
    gen = torch.Generator().manual_seed(1)
    weights = _layer(("q4",) * 4, False, gen)
    lens = [900, 1000, 700]
    step = _step(lens, [-1, -1, -1], gen)
    shape = Shape(HEADS, KV_HEADS, 1e-5, D**-0.5, 0)
    residual = torch.randn(3, H, generator=gen)
    k_buf, v_buf = (torch.randn(3, 1024, KV_HEADS, D, generator=gen).bfloat16() for _ in "kv")
    cache = torch.zeros(1, 4, KV_HEADS, D, dtype=torch.bfloat16)
    ours, ref = residual.clone(), residual.clone()
    decode_layer(ours, weights, step, k_buf.clone(), v_buf.clone(), cache, cache.clone(), shape)
    decode_layer_ref(ref, weights, step, k_buf.clone(), v_buf.clone(), cache, cache.clone(),
                     shape)  # fmt: skip
    assert (ours - ref).norm() < 1e-3 * (ref - residual).norm()


def _rows(step: StepTensors, rows: slice) -> StepTensors:
    return StepTensors(*(t[rows] for t in (step.cos, step.sin, step.seq_lens, step.slots,
                                           step.buffer_rows)))  # fmt: skip


@pytest.mark.parametrize("window", [0, 4])
def test_tokens_sharing_a_buffer_row_equal_decoding_them_one_by_one(window):
    """Speculative verification: a sequence's 3 tokens at consecutive lengths of one buffer
    row, beside a one-token sequence, give what 3 decode steps of one token each give."""
    gen = torch.Generator().manual_seed(2)
    weights = _layer(("q8", "q4", "q8", "q8"), True, gen)
    step = _step([6, 7, 8, 20], [5, 6, 7, 12], gen, buffer_rows=[1, 1, 1, 0])
    shape = Shape(HEADS, KV_HEADS, 1e-5, D**-0.5, window)
    residual = torch.randn(4, H, generator=gen)
    k_buf, v_buf = (torch.randn(2, 32, KV_HEADS, D, generator=gen).bfloat16() for _ in "kv")
    caches = [torch.zeros(4, 4, KV_HEADS, D, dtype=torch.bfloat16) for _ in "kv"]
    together = [t.clone() for t in (residual, k_buf, v_buf, *caches)]
    decode_layer(together[0], weights, step, *together[1:], shape)
    ref = [t.clone() for t in (residual, k_buf, v_buf, *caches)]
    decode_layer_ref(ref[0], weights, step, *ref[1:], shape)
    one_by_one = [t.clone() for t in (residual, k_buf, v_buf, *caches)]
    for m in range(4):
        part = one_by_one[0][m : m + 1]  # NOTE: a view: the kernel updates it in place
        decode_layer(part, weights, _rows(step, slice(m, m + 1)), *one_by_one[1:], shape)
    update = (ref[0] - residual).norm()
    # NOTE: exactly: every row is quantized, multiplied and attended on its own.
    assert torch.equal(together[0], one_by_one[0])
    assert (together[0] - ref[0]).norm() < 1e-3 * update
    for got, expected in zip(together[1:], one_by_one[1:], strict=True):
        assert torch.equal(got, expected)


def test_a_buffer_row_outside_the_buffers_is_refused():
    gen = torch.Generator().manual_seed(3)
    weights = _layer(("q4",) * 4, False, gen)
    step = _step([3], [-1], gen, buffer_rows=[2])
    k_buf, v_buf = (torch.zeros(2, 8, KV_HEADS, D, dtype=torch.bfloat16) for _ in "kv")
    cache = torch.zeros(1, 4, KV_HEADS, D, dtype=torch.bfloat16)
    shape = Shape(HEADS, KV_HEADS, 1e-5, D**-0.5, 0)
    with pytest.raises(RuntimeError, match="outside its buffers"):
        decode_layer(torch.randn(1, H), weights, step, k_buf, v_buf, cache, cache.clone(), shape)
