"""A step being planned: what `Scheduler.schedule` accumulates before it builds a StepInput."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_runner.step_input import NewSequence, ScheduledChunk

if TYPE_CHECKING:
    from actors.scheduler.sequence import Sequence


class Plan:
    """The token budget left, the sequences scheduled with their token counts (and those
    that sample), and the runner's inputs gathered so far (new sequences, chunks, copy-on-write
    block copies)."""

    __slots__ = ("budget", "scheduled", "samplers", "new_seqs", "chunks", "copies")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: list[tuple[Sequence, int]] = []
        self.samplers: list[Sequence] = []  # the scheduled sequences this step samples for
        self.new_seqs: list[NewSequence] = []
        self.chunks: list[ScheduledChunk] = []
        self.copies: list[tuple[int, int]] = []
