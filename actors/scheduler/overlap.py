"""Overlapped scheduling: step N+1 is planned while step N runs.

A sequence whose step-N chunk samples a token takes, in step N+1, a placeholder row: its
input is "the token step N samples for it", which the runner resolves from its own record
of step N's samples (`ScheduledChunk.num_placeholders`). The host learns that token one
step later, in `Scheduler.update`. At most two steps are in flight, and a step is planned
with at most one in flight, so a sequence has at most one placeholder when planned.

Which rows step synchronously (they join the first step planned after their result):
- a grammar: the next bitmask needs the matcher to have accepted the token on the host;
- pending forks (n > 1): the samples fork from the leader's blocks when its prompt is done;
- the token in flight is the last one (max_tokens or max_model_len): nothing to plan;
- speculation (actors/scheduler/speculation.py): a sequence that proposes next needs the
  tokens in flight for its proposal, and a speculating step's accepted count.
Rows that plan ahead anyway, with what may end them one step late:
- eos and stop_token_ids: found in `update(N)`; step N+1's token for that sequence is
  discarded, never emitted, and its KV slot freed when step N+1 returns;
- stop strings: found by the detokenizer, which already cuts at the match and aborts the
  request (reason "stop") a step or more after it, with or without overlap;
- min_tokens, penalties, seeds: the runner advances that state itself, in step order.
A step planned ahead never preempts, and never ends a sequence "length" for want of blocks:
when one cannot grow it stops there, and the next step waits for the steps in flight.
"""

from __future__ import annotations

from typing import NamedTuple

from actors.scheduler.sequence import Sequence
from actors.scheduler.speculation import Speculation

MAX_STEPS_IN_FLIGHT = 2


class InFlightStep(NamedTuple):
    step_id: int
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens computed)
    samplers: list[Sequence]  # the sequences it samples a token for


def plans_ahead(seq: Sequence, max_model_len: int, spec: Speculation | None = None) -> bool:
    """Whether `seq` may be planned while a step in flight samples its next token."""
    if seq.num_pending == 0:
        return True
    if seq.request.sampling.grammar is not None or seq.forks or seq.num_drafts:
        return False
    if spec is not None and spec.steps_synchronously(seq):
        return False
    if seq.num_output_tokens + seq.num_pending >= seq.request.max_tokens:
        return False
    return seq.num_planned_tokens < max_model_len
