"""CPU decode steps through one C++ call per layer (`kernels.cpu_decode_layer`).

At one decode row a step of a small model is mostly overhead: torch.compile fuses the
elementwise work of a layer (`model_runner.compiled_decode`), but every call of the
compiled graph and every custom GEMM inside it still costs ~10-15 us, against ~20 us for
the GEMM itself. With the int8-dot kernels the whole layer runs in C++ instead: one call
per layer, no graph, no guards, float32 between the GEMMs.

It applies to decode-only steps of at most `max_rows` token rows that use the decode
context (append or gather mode; a sequence verifying speculative tokens takes a row per
token: `DecodeContext` multi-token steps), on CPUs where the int8-dot kernels run and every
projection of the model has an int8-dot layout (q4 or q8), with bf16 K/V, full NeoX rotary,
no o_proj bias and a float32 residual stream; anything else takes `CompiledDecode` or the eager
forward. `--enforce-eager` turns it off too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import ops
from kernels.cpu_decode_layer import (
    LAYOUT_CODES,
    LayerWeights,
    Shape,
    StepTensors,
    decode_layer,
)
from model_runner.attention import AttentionMetadata
from model_runner.compiled_decode import cpu_decode_path_allowed, decode_layers
from model_runner.quant.quantized_linear import QuantizedLinear


def layer_weights(layer) -> LayerWeights | None:
    """A layer's tensors for the kernel, None unless every projection is int8-dot."""
    projs = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
    methods = [p.method for p in projs]
    if not all(isinstance(m, QuantizedLinear) and m.packed is not None for m in methods):
        return None
    if any(m.layout not in LAYOUT_CODES for m in methods) or layer.o_proj.bias is not None:
        return None
    if layer.input_layernorm.dtype != torch.float32:
        return None
    bias = layer.qkv_proj.bias
    return LayerWeights(
        layer.input_layernorm,
        layer.post_attention_layernorm,
        tuple((m.packed, m.scales) for m in methods),
        tuple(LAYOUT_CODES[m.layout] for m in methods),
        None if bias is None else bias.float().contiguous(),
    )


class FusedDecode:
    """The fused decode path of one model (see the module)."""

    def __init__(self, model, layers: list[LayerWeights], max_rows: int):
        cfg = model.config
        self.model = model
        self.layers = layers
        self.max_rows = max_rows
        self.verify_steps = 0  # steps run with speculative tokens (several rows a sequence)
        window = cfg.sliding_window or 0
        self.shape = Shape(cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
                           cfg.head_dim**-0.5, window)  # fmt: skip

    @classmethod
    def create(cls, model, plan, config, kv_dtype: torch.dtype, has_decode_context: bool):
        """The fused path where it applies (see the module), else None."""
        cfg = model.config
        if not cpu_decode_path_allowed(config, plan, has_decode_context):
            return None
        if plan.kernel != "int8-dot" or kv_dtype != torch.bfloat16:
            return None
        if (
            cfg.head_dim % 16
            or cfg.hidden_size % 16
            or model.cos_sin_cache.shape[1] != cfg.head_dim
        ):
            return None
        found = decode_layers(model, plan, layer_weights)
        return None if found is None else cls(model, *found)

    def applies(self, meta: AttentionMetadata, rows: int) -> bool:
        return meta.decode_context is not None and rows <= self.max_rows

    def run(self, input_ids, positions, kv_caches, meta, logits_indices) -> torch.Tensor:
        """The model's forward for an applicable decode step: float32 logits."""
        model, ctx = self.model, meta.decode_context
        self.verify_steps += ctx.multi_token
        residual = F.embedding(input_ids, model.embedding).float()
        cos, sin = ops.rotary_tables(positions, model.cos_sin_cache, torch.float32)
        step = StepTensors(cos[:, 0].contiguous(), sin[:, 0].contiguous(), ctx.token_lens,
                           meta.slot_mapping.long(), ctx.token_rows)  # fmt: skip
        for weights, buffers, paged in zip(self.layers, ctx.buffers, kv_caches, strict=True):
            if not ctx.append:
                ctx.gather(buffers, paged, ctx.num_rows)
            decode_layer(residual, weights, step, *buffers, *paged, self.shape)
        zeros = torch.zeros_like(residual, dtype=model.embedding.dtype)
        return model.logits(zeros, residual, logits_indices)
