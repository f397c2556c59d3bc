"""Decode steps of a few sequences through torch.compile: the CPU's CUDA-graph counterpart.

At one decode row a CPU step is mostly op overhead: a layer's projections read 4-bit
weights in ~0.12 ms, while the ~25 small eager ops around them (norms, rotary, residual
adds, splits, SiLU, attention glue) cost as much again. `CompiledDecode` runs each layer of
a decode-only step as one torch.compile'd function of plain tensors (inductor fuses the
elementwise work into C++ loops; the quantized GEMMs and SDPA stay library calls), the same
compiled code for every layer, with the sequence count and context length dynamic.

What stays eager: the K/V writes. The compiled layer attends over the decode context plus
the new token (concatenated, so nothing large is mutated inside the graph) and returns the
new K/V, which the caller writes into the paged cache and the decode context, as the eager
path does. It applies to decode-only steps that continue the decode context (its append
mode) with at most `max_rows` rows, on quantized projections; anything else runs eagerly. A
compile error turns it off for the process (logged), and `--enforce-eager` never builds it.

NOTE: inductor keeps fused intermediates in float32 where eager rounds each op to bf16, so
compiled and eager steps agree to bf16 precision, not bit for bit; the exact float32 mode
never compiles.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import ops
from kernels.activation import silu_and_mul_ref
from kernels.layernorm import rms_norm_ref
from kernels.paged_attention import decode_attention
from kernels.rotary import rotate_with_tables
from model_runner.attention import AttentionMetadata
from model_runner.quant.int4_weights import GROUP_SIZE
from model_runner.quant.quantized_linear import QuantizedLinear, quantized_matmul

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """What every layer shares (compile-time constants)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float


def decode_layer(
    hidden: torch.Tensor,  # [S, H] bf16: the previous layer's output (zeros before layer 0)
    residual: torch.Tensor,  # [S, H] float32
    weights: list[torch.Tensor],  # LayerWeights.tensors
    cos: torch.Tensor,
    sin: torch.Tensor,  # [S, 1, D] rotation tables
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,  # [S, L, KVH, D]: the context before this step's token
    mask: torch.Tensor | None,  # [S, 1, 1, L + 1] bool, None when every position is seen
    shape: LayerShape,
    layouts: tuple[str, str, str, str],  # QuantizedLinear.layout of qkv, o, gate_up, down
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per sequence; mirrors LlamaDecoderLayer.forward."""
    n1, n2, qkv_w, qkv_sz, o_w, o_sz, gu_w, gu_sz, d_w, d_sz, qkv_bias = weights
    rows, dtype = hidden.shape[0], hidden.dtype
    h, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    summed = residual + hidden
    qkv = quantized_matmul(rms_norm_ref(summed, n1, shape.eps).to(dtype), layouts[0], qkv_w, qkv_sz)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    qk = qkv[:, : (h + kvh) * d].view(rows, h + kvh, d)
    rot = rotate_with_tables(qk, cos, sin)
    q, k_new = rot[:, :h], rot[:, h:]
    v_new = qkv[:, (h + kvh) * d :].view(rows, kvh, d)
    keys = torch.cat([k_ctx, k_new[:, None]], dim=1)
    values = torch.cat([v_ctx, v_new[:, None]], dim=1)
    attn = decode_attention(q, keys, values, mask, shape.scale)
    summed = summed + quantized_matmul(attn.reshape(rows, h * d), layouts[1], o_w, o_sz)
    gate_up = quantized_matmul(
        rms_norm_ref(summed, n2, shape.eps).to(dtype), layouts[2], gu_w, gu_sz
    )
    down = quantized_matmul(silu_and_mul_ref(gate_up), layouts[3], d_w, d_sz)
    return down, summed, k_new, v_new


@dataclass(frozen=True)
class LayerWeights:
    tensors: list[torch.Tensor | None]
    layouts: tuple[str, str, str, str]


def layer_weights(layer) -> LayerWeights | None:
    """A layer's tensors for `decode_layer`, None unless every projection is quantized."""
    methods = [
        p.method for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
    ]
    if not all(isinstance(m, QuantizedLinear) and m.packed is not None for m in methods):
        return None
    if layer.o_proj.bias is not None or layer.input_layernorm.dtype != torch.float32:
        return None
    tensors = [layer.input_layernorm, layer.post_attention_layernorm]
    for m in methods:
        tensors += [m.packed, m.scales]
    tensors.append(layer.qkv_proj.bias)
    return LayerWeights(tensors, tuple(m.layout for m in methods))


def warm_shapes(model) -> list[tuple[int, int, int]]:
    """(sequences, context length, context buffer length) of the warm-up calls: one row
    (torch.compile specializes size 1) and several, with a mask. Their sizes are ones no
    other argument has: dynamic sizes that are equal share one symbol, and a 2-row graph
    would guard on rows == a 2 of the scales' shapes, recompiling for 3 rows."""
    cfg = model.config
    taken = {
        2,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.hidden_size // GROUP_SIZE,
        cfg.intermediate_size // GROUP_SIZE,
    }
    for layer in model.layers:
        for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            taken.update(proj.method.packed.shape)
            taken.update(proj.method.scales.shape)  # fmt: skip

    def free(n: int) -> int:
        while n in taken:
            n += 1
        taken.add(n)
        return n

    rows, length = free(5), free(37)
    return [(1, length, free(2 * length)), (rows, length, free(2 * length + 1))]


def _mark_dynamic(args: list, rows: int) -> None:
    """Mark the sequence and context dimensions of `_layer`'s arguments dynamic, the rest
    static: (fully dynamic shapes made a one-row step ~25% slower here)."""
    seq = [0] if rows > 1 else []  # size 1 stays specialized
    dims = [seq] * 4 + [seq + [1]] * 2 + [[0, 3]]  # hidden, residual, cos, sin, k, v, mask
    for t, marked in zip(args, dims, strict=True):
        for dim in marked if t is not None else ():
            torch._dynamo.mark_dynamic(t, dim)


def cpu_decode_path_allowed(config, plan, has_decode_context: bool) -> bool:
    """What the compiled and fused decode paths both need: the CPU, a decode context to
    continue (none in batch-invariant mode) and no --enforce-eager."""
    return not config.enforce_eager and has_decode_context and plan.device.type == "cpu"


def decode_layers(model, plan, layer_weights) -> tuple[list, int] | None:
    """(every layer's `layer_weights`, the most rows of a step: the quantized GEMM's
    crossover) of a compiled or fused decode path, None where a layer cannot take it."""
    layers = [layer_weights(layer) for layer in model.layers]
    max_rows = plan.int4_max_rows if plan.int4_max_rows is not None else 8
    return None if any(w is None for w in layers) or max_rows < 1 else (layers, max_rows)


class CompiledDecode:
    """The compiled decode path of one model (see the module); `run` or eager."""

    def __init__(self, model, layers: list[LayerWeights], max_rows: int):
        cfg = model.config
        self.model = model
        self.max_rows = max_rows
        self.layers = layers
        self.shape = LayerShape(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim**-0.5,
        )  # fmt: skip
        # cpp_wrapper: the graph's launcher in C++ too (~2.5 ms less per 30-layer step here).
        self.step_fn = torch.compile(decode_layer, dynamic=None, options={"cpp_wrapper": True})
        self.enabled = True

    @classmethod
    def create(cls, model, plan, config, has_decode_context: bool) -> CompiledDecode | None:
        """The compiled path where it applies (CPU, 4-bit projections, bf16, and a decode
        context to continue: none in batch-invariant mode), else None."""
        if not cpu_decode_path_allowed(config, plan, has_decode_context):
            return None
        if plan.quantization == "none" or plan.dtype != torch.bfloat16:
            return None
        found = decode_layers(model, plan, layer_weights)
        return None if found is None else cls(model, *found)

    def applies(self, meta: AttentionMetadata, rows: int) -> bool:
        ctx = meta.decode_context
        return self.enabled and ctx is not None and ctx.append and rows <= self.max_rows

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile before serving (the inductor cache makes later starts quick)."""
        start = time.perf_counter()
        cfg = self.model.config
        try:
            for rows, length, buffer_length in warm_shapes(self.model):
                hidden = torch.zeros(rows, cfg.hidden_size, dtype=torch.bfloat16)
                cos = torch.ones(rows, 1, cfg.head_dim, dtype=torch.bfloat16)
                # a slice of a longer buffer, as the decode context's (its strides)
                shape = (rows, buffer_length, cfg.num_kv_heads, cfg.head_dim)
                k_ctx, v_ctx = (torch.zeros(shape, dtype=torch.bfloat16)[:, :length] for _ in "kv")
                mask = None if rows == 1 else torch.ones(rows, 1, 1, length + 1, dtype=torch.bool)
                args = [hidden, hidden.float(), cos, cos.clone(), k_ctx, v_ctx, mask]
                _mark_dynamic(args, rows)
                self._layer(0, *args)
        except Exception as e:  # a missing C++ compiler, an inductor bug: serve eagerly
            log.warning("compiled decode steps are off (%s); steps run eagerly", e)
            self.enabled = False
            return
        log.info("compiled decode steps ready in %.1f s", time.perf_counter() - start)

    def _layer(self, i, hidden, residual, cos, sin, k_ctx, v_ctx, mask):
        w = self.layers[i]
        return self.step_fn(hidden, residual, w.tensors, cos, sin, k_ctx, v_ctx, mask,
                            self.shape, w.layouts)  # fmt: skip

    def run(self, input_ids, positions, kv_caches, meta, logits_indices) -> torch.Tensor:
        """The model's forward for an applicable decode step: float32 logits."""
        model, ctx = self.model, meta.decode_context
        residual = F.embedding(input_ids, model.embedding).float()
        hidden = torch.zeros_like(residual, dtype=torch.bfloat16)
        cos, sin = ops.rotary_tables(positions, model.cos_sin_cache, torch.bfloat16)
        rows, length = input_ids.shape[0], ctx.max_len - 1
        mask = None if rows == 1 else ctx.mask_before_new(length)
        for i, ((k_buf, v_buf), (k_cache, v_cache)) in enumerate(
            zip(ctx.buffers, kv_caches, strict=True)
        ):
            hidden, residual, k_new, v_new = self._layer(
                i, hidden, residual, cos, sin, k_buf[:rows, :length], v_buf[:rows, :length], mask
            )
            ops.write_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping, True)
            ctx.append_rows((k_buf, v_buf), k_new, v_new)
        return model.logits(hidden, residual, logits_indices)
