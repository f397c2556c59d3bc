"""One decoder layer of a CPU decode step in one call (`kernels/csrc/decode_layer.cpp`),
beside its torch reference.

For S new tokens (rows), with the float32 residual stream r [S, H]:

    r += o_proj(attention(rope(qkv_proj(rms_norm(r, norm1)) + bias)))
    r += down_proj(silu(gate) * up),  [gate | up] = gate_up_proj(rms_norm(r, norm2))

The projections are int8-dot weights (`kernels.int8_dot_linear`, layout q4 or q8 each);
everything between them stays float32. The new token's K and V, rounded to bf16, are
written into the paged cache at `slots` (negative: none) and into the decode-context
buffers [buffer rows, capacity, kv_heads, dim] at position `seq_lens - 1` of their
buffer row `buffer_rows`; the attention reads each row's context from its buffer row:
positions [lo, seq_len) with lo = seq_len - window under a sliding window, else 0. A
sequence of one token has a buffer row of its own; one verifying speculative tokens has a
row per token, sharing its buffer row at consecutive lengths (every row's K/V is written
before any row attends: causal within the sequence). `r`, the buffers and the caches are
updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.activation import silu_and_mul_ref
from kernels.int8_dot_linear import q4_linear_ref, q8_linear_ref
from kernels.layernorm import rms_norm_ref
from kernels.paged_attention import decode_attention
from kernels.rotary import rotate_with_tables

LAYOUT_CODES = {"q4": 0, "q8": 1}


@dataclass(frozen=True)
class LayerWeights:
    """One layer's tensors, as the kernel takes them."""

    norm1: torch.Tensor  # [H] float32
    norm2: torch.Tensor
    projections: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (packed, scales): qkv, o, gu, d
    layouts: tuple[int, int, int, int]  # LAYOUT_CODES of each
    qkv_bias: torch.Tensor | None  # [q + 2 kv] float32


@dataclass(frozen=True)
class StepTensors:
    """What every layer of one step shares."""

    cos: torch.Tensor  # [S, D] float32 (cos | cos)
    sin: torch.Tensor  # [S, D] float32 (-sin | sin)
    seq_lens: torch.Tensor  # [S] int64, the row's token included
    slots: torch.Tensor  # [S] int64 paged-cache slots
    buffer_rows: torch.Tensor  # [S] int64 the decode-context row each row reads and writes


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    eps: float
    scale: float
    window: int  # 0: none


def decode_layer(residual, weights: LayerWeights, step: StepTensors, k_buf, v_buf, k_cache,
                 v_cache, shape: Shape) -> None:  # fmt: skip
    """The layer (see the module), in place."""
    (qkv, o, gu, down) = weights.projections
    torch.ops.tokenmill_int8_dot.decode_layer(
        residual, weights.norm1, weights.norm2, *qkv, weights.qkv_bias, *o, *gu, *down,
        list(weights.layouts), step.cos, step.sin, k_buf, v_buf, k_cache, v_cache,
        step.seq_lens, step.slots, step.buffer_rows, shape.heads, shape.kv_heads, shape.eps,
        shape.scale, shape.window,
    )  # fmt: skip


def _project(x: torch.Tensor, layout: int, packed, scales) -> torch.Tensor:
    ref = q8_linear_ref if layout == LAYOUT_CODES["q8"] else q4_linear_ref
    return ref(x, packed, scales, True)


def decode_layer_ref(residual, weights: LayerWeights, step: StepTensors, k_buf, v_buf, k_cache,
                     v_cache, shape: Shape) -> None:  # fmt: skip
    """Torch reference of `decode_layer`."""
    rows, d = residual.shape[0], k_buf.shape[-1]
    h, kvh = shape.heads, shape.kv_heads
    (qkv_w, o_w, gu_w, down_w), lay = weights.projections, weights.layouts
    qkv = _project(rms_norm_ref(residual, weights.norm1, shape.eps), lay[0], *qkv_w)
    if weights.qkv_bias is not None:
        qkv = qkv + weights.qkv_bias
    qk = qkv[:, : (h + kvh) * d].view(rows, h + kvh, d)
    qk = rotate_with_tables(qk, step.cos[:, None], step.sin[:, None])
    q, k_new = qk[:, :h], qk[:, h:].to(k_buf.dtype)
    v_new = qkv[:, (h + kvh) * d :].view(rows, kvh, d).to(v_buf.dtype)
    pos, buf = step.seq_lens - 1, step.buffer_rows
    k_buf[buf, pos] = k_new
    v_buf[buf, pos] = v_new
    valid = step.slots >= 0
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache.view(-1, kvh, d)[step.slots[valid]] = new[valid]
    out = torch.empty(rows, h, d)
    for m in range(rows):
        n = int(step.seq_lens[m])
        lo = max(0, n - shape.window) if shape.window else 0
        b = int(buf[m])
        keys, values = (t[b : b + 1, lo:n].float() for t in (k_buf, v_buf))
        out[m] = decode_attention(q[m : m + 1], keys, values, None, shape.scale)[0]
    residual += _project(out.reshape(rows, h * d), lay[1], *o_w)
    gate_up = _project(rms_norm_ref(residual, weights.norm2, shape.eps), lay[2], *gu_w)
    residual += _project(silu_and_mul_ref(gate_up), lay[3], *down_w)
