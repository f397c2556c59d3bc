"""The executor actor: owns the model runner (and the GPU); one step at a time."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import msgspec

from actors.actor import Actor
from actors.protocol import ExecutorReady, StepFailed, StepPlan, StepResult
from actors.transport import Transport

log = logging.getLogger(__name__)


class ExecutorActor(Actor):
    """Loads the model in `start`, then runs each StepPlan in a dedicated worker thread.

    NOTE: the step runs off the event loop so heartbeats and messages keep flowing; torch
    releases the GIL inside its kernels.
    """

    name = "executor"

    def __init__(self, transport: Transport, runner_factory) -> None:
        super().__init__(transport)
        self.runner_factory = runner_factory
        self.runner = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-step")
        self.scheduler = transport.outbox("scheduler")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.runner = await loop.run_in_executor(self.worker, self.runner_factory)
        r = self.runner
        self.scheduler.send(
            ExecutorReady(
                num_blocks=r.num_blocks,
                block_size=r.block_size,
                max_model_len=r.max_model_len,
                vocab_size=r.vocab_size,
                eos_token_ids=list(r.eos_token_ids),
            )
        )

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case StepPlan(step=step):
                loop = asyncio.get_running_loop()
                try:
                    output = await loop.run_in_executor(self.worker, self.runner.execute, step)
                except Exception as e:
                    log.exception("step %d failed", step.step_id)
                    self.scheduler.send(StepFailed(step_id=step.step_id, message=repr(e)))
                    return
                self.scheduler.send(StepResult(output=output))
