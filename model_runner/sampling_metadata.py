"""A step's sampling parameters as tensors, built once per step in one pass over the rows.

Everything the batched sampler applies comes from here: per-row parameter tensors [R],
flattened (row, token) index lists for the sparse edits (min_tokens masks, logit_bias), the
rows with penalties, and host flags that skip whole stages. Greedy rows carry temperature 1
and no truncation, so the random path can run over every row and `where` picks per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_runner.counter_rng import signed_seed, token_keys
from model_runner.input_batch import SequenceState
from model_runner.sampling_params import SamplingParams
from model_runner.step_upload import to_device

# Unseeded rows of step s draw from keys (engine seed, s * _ROW_SPAN + row).
_ROW_SPAN = 1 << 20


def has_penalties(p: SamplingParams) -> bool:
    return p.penalized


def min_tokens_active(seq: SequenceState) -> bool:
    return seq.num_output_tokens < seq.sampling.min_tokens


def plain_greedy(seq: SequenceState) -> bool:
    p = seq.sampling
    return (
        p.greedy
        and p.logprobs is None
        and not p.logit_bias
        and not has_penalties(p)
        and not min_tokens_active(seq)
    )


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """One step's sampling inputs (see the module); R rows, in the order of the logits."""

    greedy: torch.Tensor  # [R] bool
    temperature: torch.Tensor  # [R] float32, 1 on greedy rows
    top_k: torch.Tensor  # [R] int64 in 1..vocab (vocab: off)
    top_p: torch.Tensor  # [R] float32 (1: off)
    min_p: torch.Tensor  # [R] float32 (0: off)
    keys: torch.Tensor  # [R] int64 counter-RNG keys (`counter_rng`)
    logit_bias: tuple[list[int], list[int], list[float]]  # rows, tokens, values
    penalized: list[tuple[int, SequenceState]]  # (row, sequence) with any penalty
    num_logprobs: list[int | None]  # per row: top logprobs wanted (None: no logprobs)
    any_greedy: bool
    any_random: bool
    any_min_p: bool
    any_truncation: bool  # some random row has top-k or top-p


def build_sampling_metadata(
    seqs: Sequence[SequenceState], vocab: int, device: torch.device, seed: int, step: int
) -> SamplingMetadata:
    """The step's metadata; `seed`/`step` key the unseeded rows' draws."""
    greedy, temp, top_k, top_p, min_p, seeds, indices = [], [], [], [], [], [], []
    bias_rows: list[int] = []
    bias_tokens: list[int] = []
    bias_values: list[float] = []
    penalized = []
    for row, s in enumerate(seqs):
        p = s.sampling
        g = p.greedy
        greedy.append(g)
        temp.append(1.0 if g else p.temperature)
        top_k.append(vocab if g or p.top_k <= 0 else min(p.top_k, vocab))
        top_p.append(1.0 if g else p.top_p)
        min_p.append(0.0 if g else p.min_p)
        if s.seed is not None:
            seeds.append(signed_seed(s.seed))
            indices.append(s.num_output_tokens)
        else:
            seeds.append(signed_seed(seed))
            indices.append(step * _ROW_SPAN + row)
        if p.logit_bias:
            for token, value in p.logit_bias.items():
                if 0 <= int(token) < vocab:
                    bias_rows.append(row)
                    bias_tokens.append(int(token))
                    bias_values.append(float(value))
        if has_penalties(p):
            penalized.append((row, s))
    greedy_t = to_device(greedy, torch.bool, device)
    any_random = not all(greedy)

    def floats(values: list[float]) -> torch.Tensor:
        return to_device(values, torch.float32, device)

    longs = to_device([top_k, seeds, indices], torch.long, device)
    return SamplingMetadata(
        greedy=greedy_t,
        temperature=floats(temp),
        top_k=longs[0],
        top_p=floats(top_p),
        min_p=floats(min_p),
        keys=token_keys(longs[1], longs[2]),
        logit_bias=(bias_rows, bias_tokens, bias_values),
        penalized=penalized,
        num_logprobs=[s.sampling.logprobs for s in seqs],
        any_greedy=any(greedy),
        any_random=any_random,
        any_min_p=any(m > 0 for m in min_p),
        any_truncation=any(k < vocab for k in top_k) or any(q < 1 for q in top_p),
    )
