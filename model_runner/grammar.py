"""Grammar state beside the runner's sequences: one matcher per sequence, one bitmask per step.

A sequence under a grammar owns a `SequenceGrammar` (an xgrammar GrammarMatcher) built when
the runner first sees it; a sequence re-sent after preemption replays its output tokens, so
the matcher's state always matches the tokens. Each step the sampler fills the bitmask rows
of the grammar sequences on the CPU and masks just those rows of the logits (xgrammar's
CPU kernel, or its Triton kernel on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import xgrammar as xgr

log = logging.getLogger(__name__)


class SequenceGrammar:
    """One sequence's GrammarMatcher, advanced by every token the sequence appends."""

    __slots__ = ("matcher", "num_rejected")

    def __init__(self, compiled: xgr.CompiledGrammar, output_token_ids: Iterable[int] = ()):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_rejected = 0
        for token in output_token_ids:
            self.accept(token)

    def accept(self, token_id: int) -> None:
        """Advance by a sampled token. NOTE: the mask allowed it, so a refusal is a bug; the
        matcher then stays where it was (logged, counted) rather than failing the step."""
        if not self.matcher.accept_token(token_id):
            self.num_rejected += 1
            log.error("grammar matcher refused token %d", token_id)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class GrammarBitmask:
    """A reusable CPU bitmask of [rows, ceil(vocab / 32)] int32; only grammar rows are filled."""

    def __init__(self, vocab_size: int, rows: int = 64) -> None:
        self.vocab_size = vocab_size
        self.mask = xgr.allocate_token_bitmask(rows, vocab_size)

    def fill(self, grammars: Sequence[SequenceGrammar | None]) -> list[int]:
        """Fill row i for every grammars[i] that is set; returns those rows (maybe none)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return rows
        if len(grammars) > self.mask.shape[0]:
            self.mask = xgr.allocate_token_bitmask(2 * len(grammars), self.vocab_size)
        for i in rows:
            grammars[i].fill(self.mask, i)
        return rows

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Set the disallowed logits of `rows` (filled by `fill`) to -inf, in place."""
        if not rows:
            return
        mask = self.mask[: logits.shape[0]]
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)

    def allows_only(self, row: int, token_ids: Iterable[int]) -> bool:
        """Whether the filled `row` allows no token outside `token_ids` (e.g. only EOS)."""
        words = self.mask[row].clone()
        for token in token_ids:
            if 0 <= token < self.vocab_size:
                word, bit = divmod(token, 32)
                words[word] &= ~_bit(bit)
        return not bool(words.any())


def _bit(bit: int) -> int:
    """The int32 value with only `bit` set (bit 31 is the sign bit)."""
    value = 1 << bit
    return value - (1 << 32) if bit == 31 else value
