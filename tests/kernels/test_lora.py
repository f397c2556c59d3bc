"""Grouped LoRA shrink/expand: the torch references against a per-token loop, the Triton
kernels against the references (interpreted on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.lora import lora_add_dense, lora_expand_ref, lora_shrink_ref, lora_slot_weights
from kernels.lora_triton import lora_expand_triton, lora_shrink_triton
from tests.kernels.helpers import assert_close, randn

# (tokens, hidden, out, rank, slots)
SHAPES = [(1, 40, 24, 8, 1), (37, 72, 50, 16, 4), (9, 33, 130, 48, 4)]


def inputs(tokens, hidden, out, rank, slots, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(tokens, hidden, dtype=dtype, device=device, gen=gen)
    a = randn(slots, rank, hidden, dtype=dtype, device=device, gen=gen, scale=0.2)
    b = randn(slots, rank, out, dtype=dtype, device=device, gen=gen, scale=0.2)
    scales = (torch.rand(slots, generator=gen) + 0.5).to(device)
    token_slots = torch.randint(-1, slots, (tokens,), generator=gen)
    token_slots[0] = slots - 1  # NOTE: at least one token has an adapter
    wide = randn(tokens, out + 7, dtype=dtype, device=device, gen=gen)
    return x, a, b, scales, token_slots.to(device), wide


def loop_reference(x, a, b, scales, token_slots, y):
    """Token by token, in float64."""
    h = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    want = y.double().cpu().clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        h[t] = x[t].double().cpu() @ a[slot].double().cpu().t()
        want[t] += scales[slot].item() * (h[t] @ b[slot].double().cpu())
    return h, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_references_match_a_per_token_loop(shape, dtype):
    x, a, b, scales, slots, wide = inputs(*shape, dtype, "cpu", seed=sum(shape))
    y = wide[:, 3 : 3 + shape[2]]  # NOTE: a column slice: rows are strided
    before = y.clone()
    want_h, want_y = loop_reference(x, a, b, scales, slots, y)
    h = lora_shrink_ref(x, a, slots)
    lora_expand_ref(y, h, b, slots, scales)
    assert_close(h.double(), want_h, dtype)
    assert_close(y.double(), want_y, dtype)
    untouched = slots < 0
    assert torch.equal(y[untouched], before[untouched])
    assert torch.equal(h[untouched], torch.zeros_like(h[untouched]))
    assert torch.equal(wide[:, :3], wide[:, :3].clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_the_references(shape, dtype, device):
    x, a, b, scales, slots, wide = inputs(*shape, dtype, device, seed=7 + sum(shape))
    y = wide[:, 3 : 3 + shape[2]]
    y_ref = y.clone()
    h = lora_shrink_triton(x, a, slots)
    h_ref = lora_shrink_ref(x, a, slots)
    assert_close(h, h_ref, dtype)
    lora_expand_triton(y, h_ref, b, slots, scales)
    lora_expand_ref(y_ref, h_ref, b, slots, scales)
    assert_close(y, y_ref, dtype)
    untouched = slots < 0
    assert torch.equal(h[untouched], torch.zeros_like(h[untouched]))
    assert torch.equal(wide[:, :3], wide.clone()[:, :3])


def test_ops_pick_the_reference_on_the_cpu(monkeypatch):
    x, a, b, scales, slots, wide = inputs(5, 16, 12, 8, 2, torch.float32, "cpu", seed=3)
    calls = []
    monkeypatch.setattr(ops, "lora_shrink_ref", lambda *args: calls.append("shrink") or
                        lora_shrink_ref(*args))  # fmt: skip
    monkeypatch.setattr(ops, "lora_expand_ref", lambda *args: calls.append("expand") or
                        lora_expand_ref(*args))  # fmt: skip
    y = wide[:, :12].clone()
    ops.lora_expand(y, ops.lora_shrink(x, a, slots), b, slots, scales)
    assert calls == ["shrink", "expand"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_cpus_dense_form_matches_shrink_and_expand(shape, dtype):
    x, a, b, scales, slots, wide = inputs(*shape, dtype, "cpu", seed=11 + sum(shape))
    y = wide[:, 3 : 3 + shape[2]]
    want = y.clone()
    lora_expand_ref(want, lora_shrink_ref(x, a, slots), b, slots, scales)
    before = y.clone()
    lora_add_dense(y, x, a, b, lora_slot_weights(slots, scales))
    assert_close(y, want, dtype)
    assert torch.equal(y[slots < 0], before[slots < 0])
