"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) on the flattened token batch.

All math goes through `kernels.ops` (looked up at call time, so the kernel selection can
change after import) and the projections through `model_runner.linear.Linear`, whose
method the `LinearPlan` picks (dense, or 4-bit planes). q/k/v are one fused projection and
gate/up another; a tied LM head is the embedding table itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels.rotary import build_cos_sin_cache
from model_runner.attention import AttentionMetadata, paged_attention
from model_runner.linear import Linear
from model_runner.linear_plan import LinearPlan
from model_runner.model_source import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def residual_dtype(plan: LinearPlan) -> torch.dtype:
    """The residual stream's dtype: float32 under bf16/fp16 activations on the CPU.

    NOTE: every bf16 rounding of the residual adds noise that 30 layers amplify; in float32
    the stream (and the norms that read it) cost nothing measurable at decode batch sizes.
    The Triton kernels take one dtype, so on CUDA the stream stays in the model's dtype.
    """
    if (
        plan.device.type == "cpu"
        and plan.dtype != torch.float32
        and not ops.use_triton(torch.empty(0))
    ):
        return torch.float32
    return plan.dtype


# How many of the largest bf16 logits of a row are recomputed in float32.
REFINED_LOGITS = 8


def refine_top_logits(
    logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Recompute each row's REFINED_LOGITS largest logits exactly in float32, in place.

    bf16 logits are rounded to 8 significant bits (steps of 0.0625-0.125 at typical
    magnitudes), so the order of near-tied top tokens would follow the rounding; from the
    float32 hidden state the top of the distribution is exact to ~1e-6, whatever kernel
    produced the rest. logits [R, V] float32, hidden [R, H] float32, weight [V, H].
    """
    top = logits.topk(REFINED_LOGITS, dim=-1).indices
    rows = F.embedding(top, weight).float()  # [R, k, H]
    exact = torch.bmm(rows, hidden[:, :, None])[:, :, 0]
    return logits.scatter_(1, top, exact)


@dataclass(frozen=True)
class ParamSlot:
    """Rows [start, end) of a plain parameter (norms, the untied embedding, biases)."""

    param: torch.Tensor
    start: int
    end: int


@dataclass(frozen=True)
class LinearSlot:
    """Shard `shard` of a projection."""

    linear: Linear
    shard: int


WeightSlot = ParamSlot | LinearSlot


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP; the residual stream is carried beside the hidden state."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, index: int):
        super().__init__()
        kw = {"dtype": residual_dtype(plan), "device": plan.device}
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
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = _param(hidden, **kw)
        self.qkv_proj = plan.linear(
            hidden, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias
        )
        self.o_proj = plan.linear(self.q_size, [hidden])
        self.post_attention_layernorm = _param(hidden, **kw)
        self.gate_up_proj = plan.linear(hidden, [inter, inter])
        self.down_proj = plan.linear(inter, [hidden])

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
        rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer over the step's flat batch."""
        if residual is None:
            residual = hidden.to(self.input_layernorm.dtype)
            hidden = ops.rms_norm(residual, self.input_layernorm, self.eps).to(hidden.dtype)
        else:
            hidden, residual = ops.fused_add_rms_norm(
                hidden, residual, self.input_layernorm, self.eps
            )
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin, True, rope_tables)
        attn = paged_attention(
            q, k, v, kv_cache, meta, self.scale, self.sliding_window, layer=self.index
        )
        hidden = self.o_proj(attn.reshape(num_tokens, self.q_size))
        hidden, residual = ops.fused_add_rms_norm(
            hidden, residual, self.post_attention_layernorm, self.eps
        )
        hidden = self.down_proj(ops.silu_and_mul(self.gate_up_proj(hidden)))
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus LM head; `forward` returns logits only for `logits_indices`."""

    def __init__(self, cfg: ModelConfig, plan: LinearPlan, max_position: int):
        super().__init__()
        self.config = cfg
        kw = {"dtype": plan.dtype, "device": plan.device}
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, plan, i) for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, dtype=residual_dtype(plan), device=plan.device)
        self.refine_logits = self.norm.dtype != plan.dtype
        # NOTE: the LM head is always dense (LinearPlan.lm_head); a tied one is the table.
        self.lm_head = plan.lm_head(cfg.hidden_size, cfg.vocab_size)
        self.embed_tokens = (
            None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, **kw)
        )
        cos_sin = build_cos_sin_cache(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin_cache", cos_sin.to(plan.device), persistent=False)

    @property
    def embedding(self) -> torch.Tensor:
        """The [vocab, hidden] token embedding table (the LM head's weight when tied)."""
        return self.lm_head.method.weight if self.embed_tokens is None else self.embed_tokens

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/positions [T]; returns float32 logits [len(logits_indices), vocab]."""
        hidden = F.embedding(input_ids, self.embedding)
        residual = None
        cos_sin = self.cos_sin_cache
        tables = ops.rotary_tables(positions, cos_sin, hidden.dtype)  # NOTE: once per step
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos_sin, tables)
        return self.logits(hidden, residual, logits_indices)

    def logits(
        self, hidden: torch.Tensor, residual: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """The final norm and LM head for the sampled rows: float32 [R, vocab]."""
        # NOTE: the final norm is per row, so only the sampled rows need it.
        hidden = hidden[logits_indices]
        residual = residual[logits_indices]
        eps = self.config.rms_norm_eps
        if not self.refine_logits:
            hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, eps)
            return self.lm_head(hidden).float()
        normed = ops.rms_norm(residual + hidden, self.norm, eps)  # float32
        logits = self.lm_head(normed.to(hidden.dtype)).float()
        return refine_top_logits(logits, normed, self.lm_head.method.weight)

    def weight_slot(self, hf_name: str) -> WeightSlot | None:
        """Where a Hugging Face weight goes, None if the model does not use it."""
        cfg = self.config
        parts = hf_name.split(".")
        if hf_name == "model.embed_tokens.weight":
            if cfg.tie_word_embeddings:
                return LinearSlot(self.lm_head, 0)
            return ParamSlot(self.embed_tokens, 0, cfg.vocab_size)
        if hf_name == "model.norm.weight":
            return ParamSlot(self.norm, 0, cfg.hidden_size)
        if hf_name == "lm_head.weight":
            return None if cfg.tie_word_embeddings else LinearSlot(self.lm_head, 0)
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None
        layer = self.layers[int(parts[2])]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        return _layer_slot(layer, module, kind)


# Hugging Face module name -> (projection attribute, shard) of a decoder layer.
LINEAR_SHARDS = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "self_attn.o_proj": ("o_proj", 0),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.down_proj": ("down_proj", 0),
}


def _layer_slot(layer: LlamaDecoderLayer, module: str, kind: str) -> WeightSlot | None:
    if module in ("input_layernorm", "post_attention_layernorm"):
        param = getattr(layer, module)
        return ParamSlot(param, 0, param.shape[0]) if kind == "weight" else None
    if module not in LINEAR_SHARDS:
        return None
    name, shard = LINEAR_SHARDS[module]
    linear: Linear = getattr(layer, name)
    if kind == "weight":
        return LinearSlot(linear, shard)
    if linear.bias is None:
        return None
    start = linear.offsets[shard]
    return ParamSlot(linear.bias, start, start + linear.output_sizes[shard])
