"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) on the flattened token batch.

All math goes through `kernels.ops` (looked up at call time, so the kernel selection can
change after import). q/k/v are one fused projection and gate/up another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels.rotary import build_cos_sin_cache
from model_runner.attention import AttentionMetadata, paged_attention
from model_runner.model_source import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP; the residual stream is carried beside the hidden state."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, index: int):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.input_layernorm = _param(cfg.hidden_size, **kw)
        self.qkv_proj = _param(self.q_size + 2 * self.kv_size, cfg.hidden_size, **kw)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, **kw) if cfg.attention_bias else None
        self.o_proj = _param(cfg.hidden_size, self.q_size, **kw)
        self.post_attention_layernorm = _param(cfg.hidden_size, **kw)
        self.gate_up_proj = _param(2 * cfg.intermediate_size, cfg.hidden_size, **kw)
        self.down_proj = _param(cfg.hidden_size, cfg.intermediate_size, **kw)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_layernorm, self.eps)
        else:
            hidden, residual = ops.fused_add_rms_norm(
                hidden, residual, self.input_layernorm, self.eps
            )
        num_tokens = hidden.shape[0]
        qkv = ops.linear(hidden, self.qkv_proj, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin, True)
        attn = paged_attention(
            q, k, v, kv_cache, meta, self.scale, self.sliding_window, layer=self.index
        )
        hidden = ops.linear(attn.reshape(num_tokens, self.q_size), self.o_proj)
        hidden, residual = ops.fused_add_rms_norm(
            hidden, residual, self.post_attention_layernorm, self.eps
        )
        hidden = ops.linear(ops.silu_and_mul(ops.linear(hidden, self.gate_up_proj)), self.down_proj)
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus LM head; `forward` returns logits only for `logits_indices`."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_position: int
    ):
        super().__init__()
        self.config = cfg
        kw = {"dtype": dtype, "device": device}
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype, device, i) for i in range(cfg.num_layers)
        )
        self.norm = _param(cfg.hidden_size, **kw)
        self.lm_head = (
            self.embed_tokens
            if cfg.tie_word_embeddings
            else _param(cfg.vocab_size, cfg.hidden_size, **kw)
        )
        cos_sin = build_cos_sin_cache(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin_cache", cos_sin.to(device), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/positions [T]; returns float32 logits [len(logits_indices), vocab]."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        residual = None
        cos_sin = self.cos_sin_cache
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos_sin)
        # NOTE: the final norm is per row, so only the sampled rows need it.
        hidden = hidden[logits_indices]
        residual = residual[logits_indices]
        hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)
        return ops.linear(hidden, self.lm_head).float()

    def weight_slot(self, hf_name: str) -> tuple[torch.Tensor, int, int] | None:
        """Where a Hugging Face weight goes: (parameter, row start, row end), None if unused."""
        cfg = self.config
        parts = hf_name.split(".")
        if hf_name == "model.embed_tokens.weight":
            return self.embed_tokens, 0, cfg.vocab_size
        if hf_name == "model.norm.weight":
            return self.norm, 0, cfg.hidden_size
        if hf_name == "lm_head.weight":
            return None if cfg.tie_word_embeddings else (self.lm_head, 0, cfg.vocab_size)
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None
        layer = self.layers[int(parts[2])]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        return _layer_slot(layer, module, kind)


def _layer_slot(layer: LlamaDecoderLayer, module: str, kind: str):
    if kind == "bias" and module not in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    ):
        return None
    q, kv = layer.q_size, layer.kv_size
    inter = layer.gate_up_proj.shape[0] // 2
    qkv = layer.qkv_proj if kind == "weight" else layer.qkv_bias
    slots = {
        "input_layernorm": (layer.input_layernorm, 0, None),
        "post_attention_layernorm": (layer.post_attention_layernorm, 0, None),
        "self_attn.q_proj": (qkv, 0, q),
        "self_attn.k_proj": (qkv, q, q + kv),
        "self_attn.v_proj": (qkv, q + kv, q + 2 * kv),
        "self_attn.o_proj": (layer.o_proj, 0, None),
        "mlp.gate_proj": (layer.gate_up_proj, 0, inter),
        "mlp.up_proj": (layer.gate_up_proj, inter, 2 * inter),
        "mlp.down_proj": (layer.down_proj, 0, None),
    }
    slot = slots.get(module)
    if slot is None or slot[0] is None:
        return None
    param, start, end = slot
    return param, start, param.shape[0] if end is None else end
