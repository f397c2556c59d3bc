"""Speculative decoding in the scheduler: which sequences propose, the n-gram proposals
(actors/scheduler/ngram.py), the back-off, and the acceptance counters.

With a draft model the runner proposes: `propose` returns K DRAFT_SLOT entries, planned as
`ScheduledChunk.num_draft_slots` with blocks for them (model_runner/draft_model.py).

A speculating decode row computes its last token plus K proposed ones in one step; the
runner samples all K + 1 positions and keeps the longest run of proposals its own samples
confirm, plus its sample after that run (model_runner/speculative.py). Speculating rows
step synchronously: their next proposal needs the tokens this one accepts.
Every position samples as plain decoding would after the proposals before it: seeds,
min_tokens, penalties and a grammar's bitmask follow them (model_runner/speculative.py).
A leader with samples still to fork (n > 1) does not speculate until they have forked.
Where the runner verifies fast only up to a number of token rows (the CPU's fused decode
layer: `max_verify_tokens`), a step's proposals stay within what its decode rows leave of it
(a wider step would run the slow general path for every row), shared evenly: a batch too
large for one proposal token per row does not speculate (see `begin_step`), nor does one
of more than `disable_by_batch_size` decoding sequences.
"""

from __future__ import annotations

from collections import deque

from actors.protocol import SpecDecodeStats
from actors.scheduler.ngram import propose_ngram
from actors.scheduler.sequence import Sequence
from model_runner.config import SpeculativeConfig

DRAFT_SLOT = -1  # a proposal the runner's draft model makes (never a token id)
RETRY_AFTER_MISS = 4  # overlapped plain steps after a miss, before the next lookup


class Speculation:
    def __init__(
        self, config: SpeculativeConfig, max_model_len: int, max_verify_tokens: int = 0
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_verify_tokens = max_verify_tokens  # 0: no limit
        self.room = self.k  # proposal tokens the step being planned may still take
        self.row_k = self.k  # the most one row of that step proposes
        self.step = 0  # steps planned, the back-off's clock
        self.num_drafts = 0  # proposals made (one per speculating row and step)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.k  # proposals whose i-th token was accepted
        self._history: dict[str, deque[tuple[int, int]]] = {}  # (proposed, accepted)
        self._paused_until: dict[str, int] = {}
        self._plain_until: dict[str, int] = {}  # after a miss: overlapped plain steps first

    def begin_step(self, num_running: int) -> None:
        """A step is planned for `num_running` decode rows at most: the room its proposals
        have (see the module). Within a verify limit every row gets the same share, and
        where that is under one token none speculates: a row that steps synchronously
        holds the whole batch's overlap back, so a few speculating rows slow the rest."""
        rows = max(1, num_running)
        self.row_k = self.k
        cut_off = self.config.disable_by_batch_size
        if cut_off is not None and num_running > cut_off:
            self.row_k = 0
        if self.max_verify_tokens:
            self.row_k = min(self.row_k, max(0, self.max_verify_tokens - rows) // rows)
        self.room = self.row_k * rows

    def took(self, num_tokens: int) -> None:
        """The step being planned verifies these proposal tokens."""
        self.room -= num_tokens

    def eligible(self, seq: Sequence) -> bool:
        """Whether the sequence speculates when it next decodes (its sampling allows it,
        and it is not backed off)."""
        if seq.forks:  # NOTE: a leader waiting to fork its samples steps one token at a time
            return False
        return self._paused_until.get(seq.seq_id, 0) <= self.step

    def steps_synchronously(self, seq: Sequence) -> bool:
        """Whether `seq` should wait for its token in flight rather than be planned ahead, to
        propose with it. NOTE: speculating rows skip the steps planned ahead; after a lookup
        that found nothing or a proposal with nothing accepted, a sequence runs
        RETRY_AFTER_MISS steps overlapped (plain) before it tries again."""
        if self.room <= 0:  # NOTE: this step has no room left for its proposals
            return False
        return self.eligible(seq) and self._plain_until.get(seq.seq_id, 0) <= self.step

    def propose(self, seq: Sequence, budget: int) -> list[int] | None:
        """Up to K tokens to verify after `seq`'s last token (which it computes now); None
        when there is no room for one (budget, max_tokens, max_model_len)."""
        room = min(
            self.row_k,
            self.room,
            budget - 1,
            seq.request.max_tokens - seq.num_output_tokens - 1,  # the step samples one more
            self.max_model_len - seq.num_tokens - 1,
        )
        if room <= 0:
            return None
        c = self.config
        if c.method == "draft_model":
            return [DRAFT_SLOT] * room
        return propose_ngram(seq.token_ids, room, c.prompt_lookup_min, c.prompt_lookup_max)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A proposal's outcome; a run of poor ones pauses the sequence's speculation."""
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1
        c = self.config
        history = self._history.setdefault(seq.seq_id, deque(maxlen=c.backoff_window))
        history.append((proposed, accepted))
        if accepted == 0:
            self._plain_until[seq.seq_id] = self.step + RETRY_AFTER_MISS
        self._check_backoff(seq.seq_id, history)

    def _check_backoff(self, seq_id: str, history: deque[tuple[int, int]]) -> None:
        c = self.config
        if len(history) < c.backoff_window:
            return
        if sum(a for _, a in history) < c.backoff_min_acceptance * sum(p for p, _ in history):
            self._paused_until[seq_id] = self.step + c.backoff_steps
            history.clear()

    def record_empty(self, seq: Sequence) -> None:
        """No n-gram matched: for the back-off, a proposal with nothing accepted (so free
        text soon decodes plainly, overlapped again); not counted as drafts."""
        c = self.config
        history = self._history.setdefault(seq.seq_id, deque(maxlen=c.backoff_window))
        history.append((1, 0))
        self._plain_until[seq.seq_id] = self.step + RETRY_AFTER_MISS
        self._check_backoff(seq.seq_id, history)

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            accepted_per_pos=list(self.accepted_per_pos),
        )

    def forget(self, seq_id: str) -> None:
        self._history.pop(seq_id, None)
        self._paused_until.pop(seq_id, None)
        self._plain_until.pop(seq_id, None)
