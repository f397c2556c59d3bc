"""Grouped LoRA shrink/expand: the torch references against a per-token loop, the Triton
kernels against the references (interpreted on the CPU), and the ops dispatch."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.lora_triton
from kernels import ops
from kernels.lora import lora_add_dense, lora_expand_ref, lora_shrink_ref, lora_slot_weights
from kernels.lora_triton import lora_expand_triton, lora_shrink_triton
from tests.kernels.helpers import assert_close, randn

# (tokens, hidden, out, rank, slots); 192 = q/k/v of rank 64 stacked (several rank blocks)
SHAPES = [(1, 40, 24, 8, 1), (37, 72, 50, 16, 4), (9, 33, 130, 48, 4), (6, 24, 70, 192, 2)]
PAD = 7  # extra columns around the strided views


def inputs(tokens, hidden, out, rank, slots, dtype, device, seed):
    """x and y are column slices of wider tensors; slots mix -1 with repeated slots."""
    gen = torch.Generator().manual_seed(seed)
    x = randn(tokens, hidden + PAD, dtype=dtype, device=device, gen=gen)[:, 2 : 2 + hidden]
    a = randn(slots, rank, hidden, dtype=dtype, device=device, gen=gen, scale=0.2)
    b = randn(slots, rank, out, dtype=dtype, device=device, gen=gen, scale=0.2)
    scales = (torch.rand(slots, generator=gen) + 0.5).to(device)
    token_slots = torch.randint(-1, slots, (tokens,), generator=gen)
    token_slots[0] = slots - 1  # NOTE: at least one token has an adapter
    if tokens >= 3:
        token_slots[1], token_slots[2] = -1, slots - 1
    wide = randn(tokens, out + PAD, dtype=dtype, device=device, gen=gen)
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


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def check_untouched(wide, before, y_cols, token_slots):
    """Columns outside y's slice and rows without an adapter keep their exact bits."""
    outside = torch.ones(wide.shape[1], dtype=torch.bool, device=wide.device)
    outside[y_cols] = False
    assert torch.equal(bits(wide[:, outside]), bits(before[:, outside]))
    idle = token_slots < 0
    assert torch.equal(bits(wide[idle]), bits(before[idle]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_references_match_a_per_token_loop(shape, dtype):
    x, a, b, scales, slots, wide = inputs(*shape, dtype, "cpu", seed=sum(shape))
    cols = slice(3, 3 + shape[2])
    y, before = wide[:, cols], wide.clone()
    want_h, want_y = loop_reference(x, a, b, scales, slots, y)
    h = lora_shrink_ref(x, a, slots)
    assert h.dtype == dtype and h.shape == (shape[0], shape[3])
    lora_expand_ref(y, h, b, slots, scales)
    # NOTE: float32 within 1e-5 relative of the float64 loop (bf16: 1e-2)
    assert_close(h.double(), want_h, dtype)
    assert_close(y.double(), want_y, dtype)
    assert torch.equal(h[slots < 0], torch.zeros_like(h[slots < 0]))
    check_untouched(wide, before, cols, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_the_references(shape, dtype, device):
    x, a, b, scales, slots, wide = inputs(*shape, dtype, device, seed=7 + sum(shape))
    cols = slice(3, 3 + shape[2])
    y, before = wide[:, cols], wide.clone()
    y_ref = y.clone()
    h = lora_shrink_triton(x, a, slots)
    h_ref = lora_shrink_ref(x, a, slots)
    assert_close(h, h_ref, dtype)
    assert torch.equal(h[slots < 0], torch.zeros_like(h[slots < 0]))
    lora_expand_triton(y, h_ref, b, slots, scales)
    lora_expand_ref(y_ref, h_ref, b, slots, scales)
    assert_close(y, y_ref, dtype)
    check_untouched(wide, before, cols, slots)


def test_triton_takes_int32_slots_and_ignores_h_of_idle_rows(device):
    x, a, b, scales, slots, wide = inputs(5, 20, 36, 16, 3, torch.float32, device, seed=11)
    slots = slots.int()
    h = lora_shrink_triton(x, a, slots)
    assert_close(h, lora_shrink_ref(x, a, slots.long()), torch.float32)
    h[slots < 0] = float("nan")  # NOTE: an idle row's h must never reach y
    y, y_ref = wide[:, :36], wide[:, :36].clone()
    lora_expand_triton(y, h, b, slots, scales)
    lora_expand_ref(y_ref, h, b, slots.long(), scales)
    assert torch.isfinite(y).all() and torch.isfinite(y_ref).all()
    assert_close(y, y_ref, torch.float32)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "matmul")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_adapter_rows_run_no_gemm(dtype):
    x, a, b, scales, slots, wide = inputs(4, 24, 20, 8, 2, dtype, "cpu", seed=5)
    slots = torch.full_like(slots, -1)
    y, before = wide[:, 1:21], wide.clone()
    with CountMatmuls() as mode:
        h = lora_shrink_ref(x, a, slots)
        lora_expand_ref(y, h, b, slots, scales)
    assert mode.count == 0
    assert h.dtype == dtype and torch.equal(h, torch.zeros(4, 8, dtype=dtype))
    assert torch.equal(wide, before)
    slots[2] = 1  # one adapter row: the GEMMs run again
    with CountMatmuls() as mode:
        lora_expand_ref(y, lora_shrink_ref(x, a, slots), b, slots, scales)
    assert mode.count == 2


def test_triton_with_no_adapter_rows(device):
    x, a, b, scales, slots, wide = inputs(3, 24, 20, 8, 2, torch.bfloat16, device, seed=6)
    slots = torch.full_like(slots, -1)
    before = wide.clone()
    h = lora_shrink_triton(x, a, slots)
    lora_expand_triton(wide[:, 2:22], h, b, slots, scales)
    assert torch.equal(h, torch.zeros_like(h)) and torch.equal(wide, before)


@pytest.mark.parametrize("env,want_triton", [(None, False), ("torch", False), ("triton", True)])
def test_ops_dispatch(env, want_triton, monkeypatch):
    """CPU tensors take the references unless TOKENMILL_KERNELS=triton (the interpreter)."""
    if env is not None:
        monkeypatch.setenv("TOKENMILL_KERNELS", env)
    x, a, b, scales, slots, wide = inputs(5, 16, 12, 8, 2, torch.float32, "cpu", seed=3)
    calls = []
    for module, name in ((ops, "lora_shrink_ref"), (ops, "lora_expand_ref"),
                         (kernels.lora_triton, "lora_shrink_triton"),
                         (kernels.lora_triton, "lora_expand_triton")):  # fmt: skip
        real = getattr(module, name)
        spy = lambda *args, real=real, name=name: calls.append(name) or real(*args)  # noqa: E731
        monkeypatch.setattr(module, name, spy)
    y = wide[:, :12].clone()
    want = y.clone()
    ops.lora_expand(y, ops.lora_shrink(x, a, slots), b, slots, scales)
    kind = "triton" if want_triton else "ref"
    assert calls == [f"lora_shrink_{kind}", f"lora_expand_{kind}"]
    lora_expand_ref(want, lora_shrink_ref(x, a, slots), b, slots, scales)
    assert_close(y, want, torch.float32)


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
