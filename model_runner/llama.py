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
from model_runner.parallel import TensorParallel, TensorSlice, rank_model_config

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


def refine_top_logits_sharded(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_start: int,
    tp: TensorParallel,
) -> torch.Tensor:
    """refine_top_logits when each rank holds rows [vocab_start, + len(weight)) of the LM
    head: a rank computes the top tokens it holds, zeros for the others; a sum joins them.
    NOTE: `logits` are the same on every rank (all-gathered), so are the top tokens."""
    top = logits.topk(REFINED_LOGITS, dim=-1).indices
    local = top - vocab_start
    held = (local >= 0) & (local < weight.shape[0])
    rows = F.embedding(local.clamp(0, weight.shape[0] - 1), weight).float()
    exact = torch.bmm(rows, hidden[:, :, None])[:, :, 0].masked_fill_(~held, 0.0)
    return logits.scatter_(1, top, tp.all_reduce(exact))


@dataclass(frozen=True)
class ParamSlot:
    """Rows [start, end) of a plain parameter (norms, the untied embedding, biases);
    `part`: the slice of the full weight this rank holds (tensor parallel)."""

    param: torch.Tensor
    start: int
    end: int
    part: TensorSlice | None = None


@dataclass(frozen=True)
class LinearSlot:
    """Shard `shard` of a projection; `part`: this rank's slice of the full weight."""

    linear: Linear
    shard: int
    part: TensorSlice | None = None


@dataclass(frozen=True)
class KVScaleSlot:
    """A layer's FP8 KV-cache scale(s) (`which`: 0 for k_scale, 1 for v_scale)."""

    layer: LlamaDecoderLayer
    which: tuple[int, ...]

    def set(self, value: float) -> None:
        """NOTE: a NaN marks a checkpoint scale that is not per-tensor (an FP8 cache refuses
        it at load; other caches never read it)."""
        scales = list(self.layer.kv_scales)
        for i in self.which:
            scales[i] = value
        self.layer.kv_scales = tuple(scales)


WeightSlot = ParamSlot | LinearSlot | KVScaleSlot
# (module, name) of a layer's KV-cache scales in the checkpoints vLLM reads: compressed-tensors
# (self_attn.k_scale; older ones k_proj.output_scale), ModelOpt (k_proj.k_scale) and the
# deprecated self_attn.kv_scale (one scale for both).
KV_SCALE_NAMES = {
    ("self_attn", "k_scale"): (0,),
    ("self_attn", "v_scale"): (1,),
    ("self_attn", "kv_scale"): (0, 1),
    ("self_attn.k_proj", "k_scale"): (0,),
    ("self_attn.v_proj", "v_scale"): (1,),
    ("self_attn.k_proj", "output_scale"): (0,),
    ("self_attn.v_proj", "output_scale"): (1,),
}


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
        # (k_scale, v_scale) of an FP8 KV cache: the checkpoint's self_attn.k_scale/v_scale
        self.kv_scales = (1.0, 1.0)
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = _param(hidden, **kw)
        self.qkv_proj = plan.linear(
            hidden, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias
        )
        self.o_proj = plan.row_parallel_linear(self.q_size, [hidden])
        self.post_attention_layernorm = _param(hidden, **kw)
        self.gate_up_proj = plan.linear(hidden, [inter, inter])
        self.down_proj = plan.row_parallel_linear(inter, [hidden])

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
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale, self.sliding_window,
                               layer=self.index, kv_scales=self.kv_scales)  # fmt: skip
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
        # Tensor parallel: this rank's heads and MLP slice; a slice of the vocabulary.
        self.tp = plan.tp if plan.tp is not None else TensorParallel()
        layer_cfg = rank_model_config(cfg, self.tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(layer_cfg, plan, i) for i in range(cfg.num_layers)
        )
        self.weight_parts = layer_weight_parts(cfg, self.tp)
        self.vocab_start, vocab_stop = self.tp.split(cfg.vocab_size)
        vocab_rows = vocab_stop - self.vocab_start
        self.vocab_part = TensorSlice(0, self.vocab_start, vocab_stop) if self.tp.enabled else None
        self.norm = _param(cfg.hidden_size, dtype=residual_dtype(plan), device=plan.device)
        self.refine_logits = self.norm.dtype != plan.dtype
        # NOTE: the LM head is always dense (LinearPlan.lm_head); a tied one is the table.
        self.lm_head = plan.lm_head(cfg.hidden_size, vocab_rows)
        self.embed_tokens = (
            None if cfg.tie_word_embeddings else _param(vocab_rows, cfg.hidden_size, **kw)
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
        hidden = self.embed(input_ids)
        residual = None
        cos_sin = self.cos_sin_cache
        tables = ops.rotary_tables(positions, cos_sin, hidden.dtype)  # NOTE: once per step
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos_sin, tables)
        return self.logits(hidden, residual, logits_indices)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]. Tensor parallel: each rank looks up the ids of its vocabulary
        slice (zeros for the others) and a sum over ranks joins them."""
        if not self.tp.enabled:
            return F.embedding(input_ids, self.embedding)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.embedding.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), self.embedding)
        return self.tp.all_reduce(hidden.masked_fill_(outside[:, None], 0.0))

    def logits(
        self, hidden: torch.Tensor, residual: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """The final norm and LM head for the sampled rows: float32 [R, vocab]."""
        # NOTE: the final norm is per row, so only the sampled rows need it.
        hidden = hidden[logits_indices]
        residual = residual[logits_indices]
        eps = self.config.rms_norm_eps
        gather = self.tp.all_gather_last_dim  # NOTE: the identity on one rank
        if not self.refine_logits:
            hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, eps)
            return gather(self.lm_head(hidden).float())
        normed = ops.rms_norm(residual + hidden, self.norm, eps)  # float32
        logits = gather(self.lm_head(normed.to(hidden.dtype)).float())
        if self.tp.enabled:
            weight = self.lm_head.method.weight
            return refine_top_logits_sharded(logits, normed, weight, self.vocab_start, self.tp)
        return refine_top_logits(logits, normed, self.lm_head.method.weight)

    def weight_slot(self, hf_name: str) -> WeightSlot | None:
        """Where a Hugging Face weight goes, None if the model does not use it."""
        cfg = self.config
        parts = hf_name.split(".")
        vocab = self.vocab_part
        if hf_name == "model.embed_tokens.weight":
            if cfg.tie_word_embeddings:
                return LinearSlot(self.lm_head, 0, vocab)
            return ParamSlot(self.embed_tokens, 0, self.embed_tokens.shape[0], vocab)
        if hf_name == "model.norm.weight":
            return ParamSlot(self.norm, 0, cfg.hidden_size)
        if hf_name == "lm_head.weight":
            return None if cfg.tie_word_embeddings else LinearSlot(self.lm_head, 0, vocab)
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None
        layer = self.layers[int(parts[2])]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if (module, kind) in KV_SCALE_NAMES:
            return KVScaleSlot(layer, KV_SCALE_NAMES[module, kind])
        return _layer_slot(layer, module, kind, self.weight_parts.get(module))


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


def layer_weight_parts(cfg: ModelConfig, tp: TensorParallel) -> dict[str, TensorSlice]:
    """Which slice of each decoder-layer weight this rank holds (empty on one rank): its
    heads' rows of q/k/v and columns of o, its slice of gate/up rows and down columns."""
    if not tp.enabled:
        return {}
    d = cfg.head_dim
    h0, h1 = tp.split(cfg.num_heads)
    kv0, kv1 = tp.kv_heads(cfg.num_kv_heads)
    i0, i1 = tp.split(cfg.intermediate_size)
    kv_rows = TensorSlice(0, kv0 * d, kv1 * d)
    return {
        "self_attn.q_proj": TensorSlice(0, h0 * d, h1 * d),
        "self_attn.k_proj": kv_rows,
        "self_attn.v_proj": kv_rows,
        "self_attn.o_proj": TensorSlice(1, h0 * d, h1 * d),
        "mlp.gate_proj": TensorSlice(0, i0, i1),
        "mlp.up_proj": TensorSlice(0, i0, i1),
        "mlp.down_proj": TensorSlice(1, i0, i1),
    }


def _layer_slot(
    layer: LlamaDecoderLayer, module: str, kind: str, part: TensorSlice | None = None
) -> WeightSlot | None:
    if module in ("input_layernorm", "post_attention_layernorm"):
        param = getattr(layer, module)
        return ParamSlot(param, 0, param.shape[0]) if kind == "weight" else None
    if module not in LINEAR_SHARDS:
        return None
    name, shard = LINEAR_SHARDS[module]
    linear: Linear = getattr(layer, name)
    if kind == "weight":
        return LinearSlot(linear, shard, part)
    if kind != "bias" or linear.bias is None:  # NOTE: e.g. a checkpoint's q_proj.q_scale
        return None
    start = linear.offsets[shard]
    return ParamSlot(linear.bias, start, start + linear.output_sizes[shard], part)
