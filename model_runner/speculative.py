"""Verifying speculative tokens in the target step (the scheduler proposes them).

A speculating row computes its last token and K proposed ones; each of its K + 1 positions
is a sampling row of its own (`DraftPosition`: the sequence's state `offset` outputs on),
sampled by the same batched sampler as every other row. The proposals are checked on the
device: position j's sample must equal proposal j + 1; the row keeps the longest confirmed
run and the sample after it (the correction, or the bonus when all K hold).

NOTE: for a proposal that is a single token (n-gram lookup: probability 1 on it), this is
exactly rejection sampling: the sample y ~ p equals the proposal x with probability p(x)
(accept), and given y != x it is distributed as p without x, renormalised, which is the
residual max(0, p - q) normalised. Seeded rows draw each position with the key of its output
index, so they produce the very tokens they would without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model_runner.step_upload import to_device

if TYPE_CHECKING:
    from model_runner.input_batch import SequenceState


class DraftPosition:
    """Sequence `seq` as the sampler sees it after the proposals `before` (those of the
    positions ahead of this one) were appended: seeds, min_tokens, penalties and the grammar
    follow them, so each position samples as plain decoding would after those tokens."""

    __slots__ = ("seq", "before")

    def __init__(self, seq: SequenceState, before: list[int]) -> None:
        self.seq = seq
        self.before = before

    def __getattr__(self, name: str):
        return getattr(self.seq, name)

    @property
    def offset(self) -> int:
        return len(self.before)

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.before)

    def penalty_state(self) -> tuple[frozenset[int], dict[int, int]]:
        prompt, counts = self.seq.penalty_state()
        if not self.before:
            return prompt, counts
        counts = dict(counts)
        for token in self.before:
            counts[token] = counts.get(token, 0) + 1
        return prompt, counts

    @property
    def grammar(self) -> _GrammarAfter | None:
        grammar = self.seq.grammar
        if grammar is None or not self.before:
            return grammar
        return _GrammarAfter(grammar, self.before)


class _GrammarAfter:
    """A sequence's grammar as it stands after `tokens`: the matcher takes them, fills the
    bitmask row, and rolls them back (xgrammar's rollback is unlimited)."""

    __slots__ = ("grammar", "tokens")

    def __init__(self, grammar, tokens: list[int]) -> None:
        self.grammar = grammar
        self.tokens = tokens

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        matcher, taken = self.grammar.matcher, 0
        for token in self.tokens:
            # NOTE: a refused proposal cannot be accepted (the mask before it excludes it):
            # this row's token is discarded, whatever mask it gets
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            taken += 1
        if not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)
        if taken:
            matcher.rollback(taken)


@dataclass(frozen=True, slots=True)
class SpecGroup:
    first_row: int  # its position 0 among the step's sampling rows
    seq: SequenceState
    drafts: list[int]


@dataclass(frozen=True, slots=True)
class SpecBatch:
    """The step's speculating rows."""

    groups: list[SpecGroup]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[G] accepted proposals per row: the leading positions whose sample is the next
        proposal (tokens: [R] samples of every sampling row, on the device)."""
        k = max(len(g.drafts) for g in self.groups)
        index, drafts = [], []
        for g in self.groups:
            d = len(g.drafts)
            index.append([g.first_row + min(j, d) for j in range(k)])
            drafts.append(g.drafts + [-1] * (k - d))  # NOTE: -1 never matches a token
        device = tokens.device
        candidates = tokens[to_device(index, torch.long, device)]
        confirmed = candidates == to_device(drafts, torch.long, device)
        return confirmed.to(torch.int32).cumprod(dim=1).sum(dim=1)

    def kept_rows(self, num_rows: int, accepted: list[int]) -> list[bool]:
        """Which sampling rows' tokens are kept: each group's first accepted + 1."""
        keep = [True] * num_rows
        for g, a in zip(self.groups, accepted, strict=True):
            for j in range(a + 1, len(g.drafts) + 1):
                keep[g.first_row + j] = False
        return keep
