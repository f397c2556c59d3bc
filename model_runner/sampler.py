"""Turning the logits of the sampled rows into tokens, with vLLM's semantics.

Order (as vLLM v1): raw logprobs (log_softmax of the model's logits) -> grammar bitmask ->
min_tokens mask -> logit_bias -> repetition/frequency/presence penalties -> greedy argmax, or
temperature -> min_p -> top-k -> top-p -> a draw. The grammar's -inf survives every later
step, so stop strings, penalties and logprobs compose with it; logprobs stay the model's own
(before the mask). A grammar that allows nothing but end-of-sequence wins over min_tokens.
A draw takes uniforms from a counter-based hash (`counter_rng`): a seeded row's from
(seed, output index, draw), so its tokens depend neither on the rest of the batch nor on
preemption; unseeded rows' from (engine seed, step, row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_runner.counter_rng import RowUniforms, token_seed
from model_runner.grammar import GrammarBitmask
from model_runner.input_batch import SequenceState
from model_runner.rejection_sampler import DraftRejection
from model_runner.sampled_rows import SampledRows
from model_runner.sampling_metadata import (
    SamplingMetadata,
    build_sampling_metadata,
    has_penalties,
    min_tokens_active,
    plain_greedy,
)
from model_runner.sampling_ops import (
    apply_min_p,
    apply_penalties,
    draw,
    greedy_argmax,
    sample_top_k_top_p,
)
from model_runner.step_input import SampledToken
from model_runner.step_upload import to_device

__all__ = ["Sampler", "token_seed"]


class Sampler:
    """Samples one token per row; `eos_token_ids` are masked while min_tokens is not reached.

    The whole batch goes through each stage at once (`SamplingMetadata`, built once per
    step): greedy and random rows alike, `where` picking per row.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.seed = seed
        self._step = 0  # keys the unseeded rows' draws
        self._bitmask = GrammarBitmask(vocab_size)

    def __call__(self, logits: torch.Tensor, seqs: list[SequenceState]) -> list[SampledToken]:
        """logits: [R, vocab] float32 (modified in place), one row per sequence in `seqs`."""
        return self.sample(logits, seqs).to_host()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[SequenceState],
        rejection: DraftRejection | None = None,
    ) -> SampledRows:
        """As `__call__`, leaving the rows on the device (no wait for the device).
        `rejection`: a draft model's sampled proposals, accepted by the rejection rule."""
        seq_ids = [s.seq_id for s in seqs]
        if not seqs:
            return SampledRows(seq_ids, torch.empty(0, dtype=torch.long, device=logits.device))
        grammar_rows = self._bitmask.fill([s.grammar for s in seqs])
        if all(plain_greedy(s) for s in seqs):
            self._bitmask.apply(logits, grammar_rows)
            return SampledRows(seq_ids, greedy_argmax(logits))
        meta = build_sampling_metadata(seqs, self.vocab_size, logits.device, self.seed, self._step)
        self._step += 1
        any_logprobs = any(n is not None for n in meta.num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any_logprobs else None
        self._bitmask.apply(logits, grammar_rows)
        self._apply_min_tokens(logits, seqs)
        rows, tokens, values = meta.logit_bias
        if rows:
            index = (_longs(rows, logits.device), _longs(tokens, logits.device))
            logits.index_put_(
                index, to_device(values, torch.float32, logits.device), accumulate=True
            )
        if meta.penalized:
            apply_penalties(logits, meta.penalized)
        sampled = pick_tokens(logits, meta)
        if rejection is not None:  # NOTE: pick_tokens left the logits divided by temperature
            sampled = rejection.apply(logits, sampled, meta)
        if raw_logprobs is None:
            return SampledRows(seq_ids, sampled)
        return _with_logprobs(raw_logprobs, sampled, seq_ids, meta.num_logprobs)

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(seqs):
            if min_tokens_active(s):
                if s.grammar is not None and self._bitmask.allows_only(i, self.eos_token_ids):
                    continue  # NOTE: the grammar is complete; masking its end leaves nothing
                stops = set(s.sampling.stop_token_ids)
                if not s.sampling.ignore_eos:
                    stops.update(self.eos_token_ids)
                stops = [t for t in stops if 0 <= t < self.vocab_size]
                rows.extend([i] * len(stops))
                cols.extend(stops)
        if rows:
            logits[rows, cols] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        penalized = [(i, s) for i, s in enumerate(seqs) if has_penalties(s.sampling)]
        if penalized:
            apply_penalties(logits, penalized)


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.long, device)


def pick_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[R] tokens: argmax on greedy rows, a draw on the others (logits modified in place).

    Random draws: temperature -> softmax -> min_p -> top-k/top-p -> inverse CDF, each over
    the whole batch; greedy rows ride along untruncated at temperature 1 and are dropped by
    the final `where`.
    """
    greedy = greedy_argmax(logits) if meta.any_greedy else None
    if not meta.any_random:
        return greedy
    logits.div_(meta.temperature[:, None])
    probs = torch.softmax(logits, dim=-1)
    if meta.any_min_p:
        apply_min_p(probs, meta.min_p)
    uniforms = RowUniforms(meta.keys)
    if meta.any_truncation:
        sampled = sample_top_k_top_p(probs, meta.top_k, meta.top_p, uniforms)
    else:
        sampled = draw(probs, uniforms())
    return sampled if greedy is None else torch.where(meta.greedy, greedy, sampled)


def _with_logprobs(
    raw_logprobs: torch.Tensor,
    tokens: torch.Tensor,
    seq_ids: list[str],
    num_logprobs: list[int | None],
) -> SampledRows:
    """The rows with each sampled token's logprob and the top-n of the rows that ask."""
    max_top = max(n or 0 for n in num_logprobs)
    top_ids = top_lps = None
    if max_top > 0:
        top_lps, top_ids = raw_logprobs.topk(max_top, dim=-1)
    return SampledRows(
        seq_ids,
        tokens,
        want_logprobs=num_logprobs,
        token_logprobs=raw_logprobs.gather(1, tokens[:, None]).squeeze(1),
        top_ids=top_ids,
        top_logprobs=top_lps,
    )
