"""The kernel selection layer the model runner calls.

Each op runs the Triton kernel when its tensors live on CUDA and the torch reference
otherwise. `TOKENMILL_KERNELS=torch` forces the references everywhere, and
`TOKENMILL_KERNELS=triton` forces Triton (on the CPU that needs `TRITON_INTERPRET=1`).
The Triton modules are imported on first use, so the CPU path never loads them.
"""

from __future__ import annotations

import os

import torch

from kernels.activation import silu_and_mul_ref
from kernels.kv_cache import write_kv_ref
from kernels.layernorm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.lora import lora_expand_ref, lora_shrink_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rotary import rotary_embedding_ref
from kernels.rotary import rotary_tables as rotary_tables_ref
from kernels.w4a16 import w4a16_linear_ref


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle a call whose main tensor is `x`."""
    forced = os.environ.get("TOKENMILL_KERNELS", "").lower()
    if forced == "torch":
        return False
    if forced == "triton":
        return True
    return x.is_cuda


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Unified paged attention; see `kernels.paged_attention.paged_attention_ref`."""
    if use_triton(query):
        from kernels.paged_attention_triton import paged_attention_triton as impl
    else:
        impl = paged_attention_ref
    return impl(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
        max_query_len=max_query_len, max_seq_len=max_seq_len,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store K/V in the paged cache at `slot_mapping`; see `kernels.kv_cache.write_kv_ref`."""
    if use_triton(key):
        from kernels.kv_cache_triton import write_kv_triton

        write_kv_triton(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_ref(key, value, key_cache, value_cache, slot_mapping, all_valid, k_scale,
                     v_scale)  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; see `kernels.layernorm.rms_norm_ref`."""
    if use_triton(x):
        from kernels.layernorm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); see `kernels.layernorm.fused_add_rms_norm_ref`."""
    if use_triton(x):
        from kernels.layernorm_triton import fused_add_rms_norm_triton

        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of query and key; see `kernels.rotary.rotary_embedding_ref`.

    `tables` (`rotary_tables`, once per step) only speed up the reference.
    """
    if use_triton(query):
        from kernels.rotary_triton import rotary_embedding_triton

        return rotary_embedding_triton(positions, query, key, cos_sin_cache, is_neox)
    return rotary_embedding_ref(positions, query, key, cos_sin_cache, is_neox, tables)


def rotary_tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference's per-step rotation tables (None where Triton runs: it needs none)."""
    if use_triton(positions):
        return None
    return rotary_tables_ref(positions, cos_sin_cache, dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up]; see `kernels.activation.silu_and_mul_ref`."""
    if use_triton(x):
        from kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Grouped LoRA shrink; see `kernels.lora.lora_shrink_ref`."""
    if use_triton(x):
        from kernels.lora_triton import lora_shrink_triton as impl
    else:
        impl = lora_shrink_ref
    return impl(x, lora_a, token_slots)


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Grouped LoRA expand, in place on y; see `kernels.lora.lora_expand_ref`."""
    if use_triton(y):
        from kernels.lora_triton import lora_expand_triton as impl
    else:
        impl = lora_expand_ref
    impl(y, h, lora_b, token_slots, scales)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> torch.Tensor:
    """Weight-only 4/8-bit GEMM; see `kernels.w4a16.w4a16_linear_ref`."""
    if use_triton(x):
        from kernels.w4a16_triton import w4a16_linear_triton as impl
    else:
        impl = w4a16_linear_ref
    return impl(x, qweight, scales, zeros, group_size, bits)
