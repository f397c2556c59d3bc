"""Rotary position embedding (NeoX and GPT-J layouts) and its cos/sin cache."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(rot_dim: int, base: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rot_dim // 2], with Llama 3 scaling when `rope_scaling` asks."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind == "llama3":
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    return inv_freq.float()


def build_cos_sin_cache(
    rot_dim: int, max_position: int, base: float, rope_scaling: dict | None = None
) -> torch.Tensor:
    """[max_position, rot_dim] float32: cos in the first half of each row, sin in the second."""
    inv_freq = rope_inv_freq(rot_dim, base, rope_scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat([o1, o2], dim=-1)
    return torch.stack([o1, o2], dim=-1).flatten(-2)


def rotary_tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's NeoX rotation tables, shared by every layer: (cos, signed sin) [T, 1, D].

    cos holds cos twice; sin holds [-sin | sin], so that x * cos + roll(x, D / 2) * sin is
    the rotation (the exact ops of x1 * cos - x2 * sin and x2 * cos + x1 * sin, in order).
    In float32 they match the reference bit for bit; in bf16 the math runs in bf16, as HF
    transformers rotates bf16 models.
    """
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    return (
        torch.cat([cos, cos], dim=-1)[:, None, :].to(dtype),
        torch.cat([-sin, sin], dim=-1)[:, None, :].to(dtype),
    )


def rotate_with_tables(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """heads [T, H, D] rotated by `rotary_tables` (NeoX, every feature), in their dtype."""
    return heads * cos + heads.roll(heads.shape[-1] // 2, dims=-1) * sin


def rotary_embedding_ref(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, Hq, D] and key [T, Hk, D] at `positions` [T]; returns new tensors.

    Only the first `rot_dim = cos_sin_cache.shape[1]` features of each head are rotated.
    The math runs in fp32 and the results come back in the inputs' dtype. `tables` from
    `rotary_tables` (NeoX, every feature rotated) take the fast path, in the inputs' dtype.
    """
    rot_dim = cos_sin_cache.shape[-1]
    num_q_heads = query.shape[1]
    if tables is not None and is_neox and rot_dim == query.shape[-1]:
        rot = rotate_with_tables(torch.cat([query, key], dim=1), *tables)
        return rot[:, :num_q_heads], rot[:, num_q_heads:]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    # One rotation of query and key heads together: half the small ops of two.
    both = torch.cat([query[..., :rot_dim], key[..., :rot_dim]], dim=1).float()
    rot = _rotate(both, cos[:, None, :], sin[:, None, :], is_neox)
    rot_q, rot_k = rot[:, :num_q_heads].to(query.dtype), rot[:, num_q_heads:].to(key.dtype)
    if rot_dim == query.shape[-1]:
        return rot_q, rot_k
    return (
        torch.cat([rot_q, query[..., rot_dim:]], dim=-1),
        torch.cat([rot_k, key[..., rot_dim:]], dim=-1),
    )
