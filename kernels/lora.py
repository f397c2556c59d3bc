"""Grouped LoRA shrink and expand (torch references; one adapter slot per token).

`lora_a [S, R, H]` and `lora_b [S, R, N]` stack S adapter slots, ranks padded to R with
zeros; `token_slots [T]` picks each token's slot, -1 for none. The references are the CPU
serving path, so they run without a loop over tokens or slots: shrink is one GEMM against
every slot at once and a gather; expand scatters each token's rank vector (times its scale)
into its slot's columns and runs one GEMM against all slots' B, whose other columns are 0.
A CPU step where no token has an adapter runs no GEMM at all (on other devices that check
would be a host sync, so it is skipped there).
"""

from __future__ import annotations

import torch


def _none_active(token_slots: torch.Tensor) -> bool:
    """No token has an adapter (only asked on the CPU, where it costs no device sync)."""
    return token_slots.device.type == "cpu" and not bool((token_slots >= 0).any())


def lora_shrink_ref(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """x [T, H], lora_a [S, R, H], token_slots [T] -> h [T, R] in x's dtype:
    h[t] = x[t] @ lora_a[slot[t]].T, and 0 where slot[t] == -1 (float32 accumulation)."""
    num_slots, rank, hidden = lora_a.shape
    tokens = x.shape[0]
    if _none_active(token_slots):
        return x.new_zeros(tokens, rank)
    every = x @ lora_a.reshape(num_slots * rank, hidden).t()  # [T, S*R]
    rows = torch.arange(tokens, device=x.device)
    h = every.view(tokens, num_slots, rank)[rows, token_slots.clamp(min=0)]  # a copy
    return h.masked_fill_((token_slots < 0).unsqueeze(1), 0.0)


def lora_expand_ref(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """In place: y [T, N] (any row stride) += scales[slot[t]] * (h[t] @ lora_b[slot[t]]) for
    slot[t] >= 0; h [T, R], lora_b [S, R, N], scales [S] float32. Rows with slot -1 get 0."""
    num_slots, rank, out = lora_b.shape
    tokens = h.shape[0]
    if _none_active(token_slots):
        return
    slots = token_slots.clamp(min=0)
    # NOTE: the scale is applied to h in float32 and rounded once; rows of tokens without an
    # adapter stay zero whatever h holds there, so their delta is exactly 0.
    scaled = h.float() * scales[slots].float().unsqueeze(1)
    scaled = torch.where((token_slots >= 0).unsqueeze(1), scaled, 0.0)
    spread = h.new_zeros(tokens, num_slots, rank)
    spread[torch.arange(tokens, device=h.device), slots] = scaled.to(h.dtype)
    y += (spread.view(tokens, num_slots * rank) @ lora_b.reshape(num_slots * rank, out)).to(y.dtype)


def lora_slot_weights(token_slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[T, S]: each token's scale in its slot's column, 0 elsewhere (a row of 0 without one).
    Built once per step; `lora_add_dense` reads it in every projection."""
    num_slots = scales.shape[0]
    onehot = token_slots.unsqueeze(1) == torch.arange(num_slots, device=token_slots.device)
    return onehot.to(scales.dtype) * scales


def lora_add_dense(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_weights: torch.Tensor,
) -> None:
    """The CPU's shrink + expand in three ops: y += ((x @ A.T) * w) @ B over every slot at
    once (A = lora_a as [S*R, H], B = lora_b as [S*R, N], views), where w spreads
    `slot_weights` over each slot's R columns: every token computes every slot's columns and
    the weights zero the other slots' (exact: it adds zeros)."""
    num_slots, rank, hidden = lora_a.shape
    tokens = x.shape[0]
    h = (x @ lora_a.view(num_slots * rank, hidden).t()).view(tokens, num_slots, rank)
    h = (h * slot_weights.to(h.dtype).unsqueeze(2)).view(tokens, num_slots * rank)
    y += (h @ lora_b.view(num_slots * rank, -1)).to(y.dtype)
