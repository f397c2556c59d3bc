"""A launched step until its sampled rows are read on the host (the runner's collect).

The runner launches step N+1 before it collects step N (model_runner/runner.py): the record
below is what it keeps of N meanwhile, and `collect` turns it into N's StepOutput, applying
the tokens to the sequence states (each speculating one once, past its accepted proposals).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model_runner.input_batch import SequenceState
from model_runner.sampled_rows import SampledRows
from model_runner.speculative import SpecBatch
from model_runner.step_input import StepOutput
from model_runner.step_timer import StepClock


class CollectFailed(RuntimeError):
    """A launched step failed while its output was being collected."""

    def __init__(self, step_id: int) -> None:
        super().__init__(f"step {step_id} failed in its collect")
        self.step_id = step_id


@dataclass(frozen=True, slots=True)
class LaunchedStep:
    """A launched step whose sampled rows are not yet read on the host."""

    step_id: int
    rows: SampledRows | None  # None: nothing sampled
    seqs: list[SequenceState]  # one per sampling row; NOTE: a finished one may be gone from _seqs
    clock: StepClock
    host_seconds: float  # the launch's host time, less the previous step's collect in it
    spec: SpecBatch | None = None  # its speculating sequences
    accepted: torch.Tensor | None = None  # [G] their accepted proposals (host copy queued)


def distinct_states(seqs: list[SequenceState]) -> list[SequenceState]:
    """Each state once (a speculating sequence has a sampling row per position)."""
    return list({id(s): s for s in seqs}.values())


def collect(step: LaunchedStep) -> StepOutput:
    """Wait for the step, apply its kept tokens to the sequence states, and return its output
    (`execute_seconds` includes this wait). Raises CollectFailed."""
    start = time.perf_counter()
    try:
        step.clock.wait()
        sampled = step.rows.to_host() if step.rows is not None else []
        seqs = step.seqs
        for seq in distinct_states(seqs):
            seq.num_pending -= 1
        if step.spec is not None:
            accepted = step.accepted.tolist()
            keep = step.spec.kept_rows(len(sampled), accepted)
            sampled = [t for t, k in zip(sampled, keep, strict=True) if k]
            seqs = [s for s, k in zip(seqs, keep, strict=True) if k]
            for group, n in zip(step.spec.groups, accepted, strict=True):
                group.seq.num_computed += n  # NOTE: the accepted proposals' K/V hold
        for seq, token in zip(seqs, sampled, strict=True):
            if seq.grammar is not None and seq.grammar.is_terminated:
                continue  # NOTE: a kept token after an accepted end; the scheduler stops
            seq.append(token.token_id)
        device_seconds = step.clock.seconds()
    except Exception as e:
        raise CollectFailed(step.step_id) from e
    return StepOutput(
        step_id=step.step_id,
        sampled=sampled,
        execute_seconds=step.host_seconds + time.perf_counter() - start,
        device_seconds=device_seconds,
    )
