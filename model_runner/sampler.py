"""Turning the logits of the sampled rows into tokens, with vLLM's semantics.

Order (as vLLM v1): raw logprobs (log_softmax of the model's logits) -> grammar bitmask ->
min_tokens mask -> logit_bias -> repetition/frequency/presence penalties -> greedy argmax, or
temperature -> min_p -> top-k -> top-p -> a draw. The grammar's -inf survives every later
step, so stop strings, penalties and logprobs compose with it; logprobs stay the model's own
(before the mask). A grammar that allows nothing but end-of-sequence wins over min_tokens.
A draw takes one uniform number per row; a seeded row takes it from its own generator,
reseeded from (seed, output index) for every token, so its tokens depend neither on the
rest of the batch nor on preemption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model_runner.grammar import GrammarBitmask
from model_runner.input_batch import SequenceState
from model_runner.sampling_ops import (
    apply_min_p,
    apply_penalties,
    draw,
    greedy_argmax,
    sample_top_k_top_p,
)
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import SampledToken

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for output token `index` of a request seeded with `seed`."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _has_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def _min_tokens_active(seq: SequenceState) -> bool:
    return seq.num_output_tokens < seq.sampling.min_tokens


def _plain_greedy(seq: SequenceState) -> bool:
    p = seq.sampling
    return (
        p.greedy
        and p.logprobs is None
        and not p.logit_bias
        and not _has_penalties(p)
        and not _min_tokens_active(seq)
    )


class Sampler:
    """Samples one token per row; `eos_token_ids` are masked while min_tokens is not reached."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._bitmask = GrammarBitmask(vocab_size)

    def __call__(self, logits: torch.Tensor, seqs: list[SequenceState]) -> list[SampledToken]:
        """logits: [R, vocab] float32 (modified in place), one row per sequence in `seqs`."""
        if not seqs:
            return []
        grammar_rows = self._bitmask.fill([s.grammar for s in seqs])
        if all(_plain_greedy(s) for s in seqs):
            self._bitmask.apply(logits, grammar_rows)
            tokens = greedy_argmax(logits).tolist()
            return [SampledToken(s.seq_id, t) for s, t in zip(seqs, tokens, strict=True)]
        want = [s.sampling.logprobs is not None for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want) else None
        self._bitmask.apply(logits, grammar_rows)
        self._apply_min_tokens(logits, seqs)
        self._apply_logit_bias(logits, seqs)
        self._apply_penalties(logits, seqs)
        tokens = self._pick(logits, seqs)
        if raw_logprobs is None:
            return [SampledToken(s.seq_id, t) for s, t in zip(seqs, tokens.tolist(), strict=True)]
        return _with_logprobs(raw_logprobs, tokens, seqs, want)

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(seqs):
            if _min_tokens_active(s):
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

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        for i, s in enumerate(seqs):
            bias = s.sampling.logit_bias
            if bias:
                tokens = [int(t) for t in bias if 0 <= int(t) < self.vocab_size]
                values = [float(bias[t]) for t in bias if 0 <= int(t) < self.vocab_size]
                logits[i, tokens] += torch.tensor(values, device=logits.device)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        penalized = [(i, s) for i, s in enumerate(seqs) if _has_penalties(s.sampling)]
        if penalized:
            apply_penalties(logits, penalized)

    def _uniform_source(
        self, seqs: list[SequenceState], device: torch.device
    ) -> Callable[[list[int]], torch.Tensor]:
        """A function giving fresh uniforms for rows; seeded rows use their own generator."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        shared = self._generators[device]
        seeded = [i for i, s in enumerate(seqs) if s.seed is not None]
        for i in seeded:
            seq = seqs[i]
            if seq.generator is None:
                seq.generator = torch.Generator(device)
            seq.generator.manual_seed(token_seed(seq.seed, seq.num_output_tokens))

        def uniforms(rows: list[int]) -> torch.Tensor:
            values = torch.rand(len(rows), generator=shared, device=device)
            if seeded:
                for j, row in enumerate(rows):
                    gen = seqs[row].generator if seqs[row].seed is not None else None
                    if gen is not None:
                        values[j] = torch.rand(1, generator=gen, device=device)[0]
            return values

        return uniforms

    def _pick(self, logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
        greedy = [s.sampling.greedy for s in seqs]
        if all(greedy):
            return greedy_argmax(logits)
        if not any(greedy):
            return self._sample(logits, seqs)
        tokens = greedy_argmax(logits)
        rows = [i for i, g in enumerate(greedy) if not g]
        tokens[rows] = self._sample(logits[rows], [seqs[i] for i in rows])
        return tokens

    def _sample(self, logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
        """Random draws for non-greedy rows: temperature, min_p, top-k, top-p."""
        device, vocab = logits.device, self.vocab_size
        params = [s.sampling for s in seqs]
        logits.div_(torch.tensor([p.temperature for p in params], device=device)[:, None])
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0 for p in params):
            apply_min_p(probs, torch.tensor([p.min_p for p in params], device=device))
        uniforms = self._uniform_source(seqs, device)
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        cut = [i for i, p in enumerate(params) if top_k[i] < vocab or p.top_p < 1]
        if not cut:
            return draw(probs, uniforms(list(range(len(seqs)))))
        k = torch.tensor([top_k[i] for i in cut], device=device)
        p = torch.tensor([params[i].top_p for i in cut], device=device)
        if len(cut) == len(seqs):
            return sample_top_k_top_p(probs, k, p, uniforms)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
        cut_rows = set(cut)
        whole = [i for i in range(len(seqs)) if i not in cut_rows]
        if whole:
            tokens[whole] = draw(probs[whole], uniforms(whole))
        tokens[cut] = sample_top_k_top_p(
            probs[cut], k, p, lambda rows: uniforms([cut[r] for r in rows])
        )
        return tokens


def _with_logprobs(
    raw_logprobs: torch.Tensor,
    tokens: torch.Tensor,
    seqs: list[SequenceState],
    want: list[bool],
) -> list[SampledToken]:
    token_list = tokens.tolist()
    sampled_lp = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    max_top = max((s.sampling.logprobs or 0) for s in seqs)
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    if max_top > 0:
        values, indices = raw_logprobs.topk(max_top, dim=-1)
        top_ids, top_lps = indices.tolist(), values.tolist()
    out = []
    for i, s in enumerate(seqs):
        if not want[i]:
            out.append(SampledToken(s.seq_id, token_list[i]))
            continue
        n = s.sampling.logprobs or 0
        top = list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if n else []
        out.append(SampledToken(s.seq_id, token_list[i], sampled_lp[i], top))
    return out
