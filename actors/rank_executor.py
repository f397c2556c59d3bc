"""The executor of a tensor-parallel rank r > 0: its shard of the model, in lockstep.

Rank 0's executor (actors.executor) answers the scheduler; this one only runs every
StepPlan it gets, in order, so that its collectives meet rank 0's. It compiles no
grammars and reads no adapters (rank 0 samples; tensor parallelism refuses LoRA).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import msgspec

from actors.actor import Actor
from actors.protocol import StepPlan, rank_executor_name
from actors.transport import Transport
from model_runner.config import EngineConfigError

log = logging.getLogger(__name__)

LOCKSTEP_LOST_EXIT_CODE = 3


class RankExecutorActor(Actor):
    """Loads this rank's shard in `start`, then runs each StepPlan in a worker thread."""

    def __init__(self, transport: Transport, rank: int, runner_factory) -> None:
        self.name = rank_executor_name(rank)  # NOTE: before the base class opens the inbox
        super().__init__(transport)
        self.rank = rank
        self.runner_factory = runner_factory
        self.runner = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-step")
        self.steps: set[asyncio.Task] = set()

    async def start(self) -> None:
        """NOTE: a setting the engine cannot serve fails on rank 0 the same way (the checks
        are the same), and rank 0 reports it; this rank waits to be stopped."""
        loop = asyncio.get_running_loop()
        try:
            self.runner = await loop.run_in_executor(self.worker, self.runner_factory)
        except EngineConfigError:
            log.debug("rank %d cannot start", self.rank, exc_info=True)
            await asyncio.Event().wait()

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case StepPlan(step=step):
                # NOTE: the one worker thread runs steps in arrival order, as on rank 0.
                task = asyncio.create_task(self.run_step(step))
                self.steps.add(task)
                task.add_done_callback(self.steps.discard)

    async def run_step(self, step) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.worker, self.runner.execute, step)
        except Exception:
            exit_lockstep_lost(self.rank, step.step_id)


def exit_lockstep_lost(rank: int, step_id: int) -> None:
    """End this process: a tensor-parallel rank whose step failed is out of lockstep with
    the others (a peer died, or a collective timed out), so the supervisor must see the
    engine dead (/health 503, open requests failed) instead of later steps hanging on it.
    NOTE: called in an exception handler; os._exit skips gloo's teardown, which may abort."""
    log.exception("tensor-parallel rank %d: step %d failed; exiting", rank, step_id)
    os._exit(LOCKSTEP_LOST_EXIT_CODE)
