"""Tensor functions of the sampler: penalties, min_p, top-k/top-p, the draw.

NOTE: CPU-friendly on purpose; nothing sorts the vocabulary (~170 ms for 32 rows on two
cores). A draw is an inverse-CDF lookup with one uniform per row (`exponential_` noise
over the vocabulary costs ~40 ms). Top-k with a small k draws among the `topk` candidates;
otherwise top-p draws from the whole distribution and rejects tokens outside the kept set
(accepted with probability >= p, so ~1 try), which leaves exactly the truncated law.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model_runner.input_batch import SequenceState
from model_runner.step_upload import to_device

SMALL_TOP_K = 256
MAX_REJECTION_TRIES = 16
ARGMAX_BLOCK = 1024


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` of [R, V], ties to the lowest index, as a two-level search.

    NOTE: on the CPU, argmax over the vocabulary runs a scalar loop (~2 ms for 32 x 49152);
    a vectorized `amax` over 1024-wide blocks, then argmax among the block maxima and within
    the winning block, gives the same index ~5x faster. Tail columns past the last whole
    block win only when strictly greater.
    """
    rows, vocab = logits.shape
    num_blocks = vocab // ARGMAX_BLOCK
    if num_blocks < 2 or not logits.is_cpu:
        return logits.argmax(dim=-1)
    body = logits[:, : num_blocks * ARGMAX_BLOCK].view(rows, num_blocks, ARGMAX_BLOCK)
    block_max, block = body.amax(dim=-1).max(dim=-1)
    row_ids = torch.arange(rows, device=logits.device)
    tokens = block * ARGMAX_BLOCK + body[row_ids, block].argmax(dim=-1)
    if num_blocks * ARGMAX_BLOCK < vocab:
        tail_max, tail = logits[:, num_blocks * ARGMAX_BLOCK :].max(dim=-1)
        tokens = torch.where(tail_max > block_max, tail + num_blocks * ARGMAX_BLOCK, tokens)
    return tokens


def apply_penalties(logits: torch.Tensor, seqs: list[tuple[int, SequenceState]]) -> None:
    """vLLM's penalties, in place, touching only the tokens that occurred.

    `seqs` holds (row, sequence). Repetition (over prompt and output tokens): positive
    logits divided by it, negative ones multiplied; then frequency times each output token's
    count, plus presence once, is subtracted.
    """
    rep_rows: list[int] = []
    rep_tokens: list[int] = []
    rep_values: list[float] = []
    sub_rows: list[int] = []
    sub_tokens: list[int] = []
    sub_values: list[float] = []
    for row, seq in seqs:
        p = seq.sampling
        prompt, counts = seq.penalty_state()
        if p.repetition_penalty != 1:
            seen = prompt.union(counts)
            rep_rows.extend([row] * len(seen))
            rep_tokens.extend(seen)
            rep_values.extend([p.repetition_penalty] * len(seen))
        if p.frequency_penalty != 0 or p.presence_penalty != 0:
            for token, count in counts.items():
                sub_rows.append(row)
                sub_tokens.append(token)
                sub_values.append(p.frequency_penalty * count + p.presence_penalty)
    device = logits.device
    if rep_rows:
        index = (to_device(rep_rows, torch.long, device), to_device(rep_tokens, torch.long, device))
        values, rep = logits[index], to_device(rep_values, torch.float32, device)
        logits[index] = torch.where(values > 0, values / rep, values * rep)
    if sub_rows:
        index = (to_device(sub_rows, torch.long, device), to_device(sub_tokens, torch.long, device))
        logits.index_put_(index, -to_device(sub_values, torch.float32, device), accumulate=True)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zero (in place) probabilities below min_p [R] times the row's largest one."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    probs.masked_fill_(probs < threshold, 0.0)


def top_k_top_p_candidates(
    probs: torch.Tensor, k: torch.Tensor, p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What vLLM's top-k then top-p keep, among each row's `width` likeliest tokens.

    probs: [R, vocab], not necessarily normalized (min_p may have zeroed some); k: [R] long
    in 1..vocab (vocab = off); p: [R] in (0, 1] (1 = off). Top-p applies to the mass left
    after top-k: a token is kept while the mass ranked above it is < p times that mass.
    Returns (weights [R, width], dropped ones 0; token ids [R, width]; enough [R]: whether
    the row's kept set lies inside the width). Ties at the k-th value are broken by index.
    """
    vocab = probs.shape[-1]
    width = min(width, vocab)
    top, ids = probs.topk(width, dim=-1)
    cum = top.cumsum(dim=-1)
    limited = k < vocab
    total = probs.sum(dim=-1)
    kept_mass = torch.where(limited, cum.gather(1, (k.clamp(max=width) - 1)[:, None])[:, 0], total)
    enough = torch.where(limited, k <= width, cum[:, -1] >= p * total) | (width == vocab)
    rank = torch.arange(width, device=probs.device)
    keep = ((cum - top) < (p * kept_mass)[:, None]) & (rank[None, :] < k[:, None])
    return top * keep, ids, enough


def sample_top_k_top_p(
    probs: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    uniforms: Callable[[list[int]], torch.Tensor],
) -> torch.Tensor:
    """Draw [R] token ids under vLLM's top-k then top-p (see `top_k_top_p_candidates`).

    `uniforms(rows)` gives a fresh uniform in [0, 1) for each listed row (each call draws
    new ones). Rows with k <= SMALL_TOP_K draw among their top-k; the others by rejection.
    """
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    k_list = k.tolist()
    small = [i for i, kk in enumerate(k_list) if kk <= SMALL_TOP_K]
    if small:
        weights, ids, _ = top_k_top_p_candidates(
            probs[small], k[small], p[small], max(k_list[i] for i in small)
        )
        tokens[small] = ids.gather(1, draw(weights, uniforms(small))[:, None])[:, 0]
    large = [i for i, kk in enumerate(k_list) if kk > SMALL_TOP_K]
    if len(large) == len(k_list):
        return _sample_by_rejection(probs, k, p, uniforms, large)
    if large:
        tokens[large] = _sample_by_rejection(probs[large], k[large], p[large], uniforms, large)
    return tokens


def _sample_by_rejection(probs, k, p, uniforms, rows: list[int]) -> torch.Tensor:
    """Draw from `probs`, keep a token if top-k/top-p keep it, else draw again."""
    num_rows, vocab = probs.shape
    total = probs.sum(dim=-1)
    kth = torch.zeros(num_rows, device=probs.device)
    kept_mass = total
    limited = k < vocab
    if bool(limited.any()):
        top = probs.topk(int(k[limited].max()), dim=-1).values
        kth = torch.where(limited, top.gather(1, (k.clamp(max=top.shape[1]) - 1)[:, None])[:, 0], 0)
        kept_mass = torch.where(limited, (probs * (probs >= kth[:, None])).sum(dim=-1), total)
    cdf = probs.cumsum(dim=-1)
    tokens = torch.empty(num_rows, dtype=torch.long, device=probs.device)
    pending = list(range(num_rows))
    for attempt in range(MAX_REJECTION_TRIES):
        sub, sub_cdf = (probs, cdf) if attempt == 0 else (probs[pending], cdf[pending])
        candidate = _draw_from_cdf(sub_cdf, uniforms([rows[i] for i in pending]))
        chosen = sub.gather(1, candidate[:, None])
        above = torch.where(sub > chosen, sub, 0.0).sum(dim=-1)
        ok = (chosen[:, 0] >= kth[pending]) & (above < p[pending] * kept_mass[pending])
        ok_list = ok.tolist()
        done = [r for r, good in zip(pending, ok_list, strict=True) if good]
        tokens[done] = candidate[ok]
        pending = [r for r, good in zip(pending, ok_list, strict=True) if not good]
        if not pending:
            return tokens
    weights, ids, _ = top_k_top_p_candidates(probs[pending], k[pending], p[pending], vocab)
    picked = draw(weights, uniforms([rows[i] for i in pending]))
    tokens[pending] = ids.gather(1, picked[:, None])[:, 0]
    return tokens


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index [R] drawn from each row of non-negative `weights` [R, W] by inverse CDF.

    uniforms: [R] in [0, 1).
    """
    return _draw_from_cdf(weights.cumsum(dim=-1), uniforms)


def _draw_from_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    # NOTE: the target stays strictly below the row total, so the index has positive weight.
    total = cdf[:, -1:]
    target = torch.minimum(
        uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
