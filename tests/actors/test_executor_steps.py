"""The executor's step loop: launching a step collects the one before it; results and
failures go back in step order, and a failed launch keeps the good step before it."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from actors.executor import ExecutorActor
from actors.protocol import ExecutorReady, StepPlan, StepResult
from actors.transport import InProcessTransport
from model_runner.grammar_cache import GrammarCache
from model_runner.step_flight import CollectFailed
from model_runner.step_input import StepInput, StepOutput


class LaunchRunner(SimpleNamespace):
    """The runner's launch/flush contract, with a gate to hold a launch and chosen faults."""

    def __init__(self, fail_launch=(), fail_collect=()):
        super().__init__(num_blocks=8, block_size=4, max_model_len=32, vocab_size=8,
                         eos_token_ids=[0], on_output=None, max_verify_tokens=0)  # fmt: skip
        self.grammars = GrammarCache(lambda: None)
        self.fail_launch, self.fail_collect = set(fail_launch), set(fail_collect)
        self.in_flight: int | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.flushes = 0
        self.collected_by: dict[int, str] = {}

    def _collect(self, by: str) -> None:
        step_id, self.in_flight = self.in_flight, None
        if step_id is None:
            return
        if step_id in self.fail_collect:
            raise CollectFailed(step_id) from RuntimeError("device fault")
        self.collected_by[step_id] = by
        self.on_output(StepOutput(step_id=step_id))

    def launch(self, step: StepInput) -> None:
        self.gate.wait(5)
        if step.step_id in self.fail_launch:
            raise RuntimeError("forward fault")
        self._collect(f"launch {step.step_id}")
        self.in_flight = step.step_id

    def flush(self) -> None:
        self.flushes += 1
        self._collect("flush")


async def run_steps(runner: LaunchRunner, step_ids: list[int], hold_first: bool = True):
    """Send every plan while the first launch is held; the messages back, in order."""
    transport = InProcessTransport()
    executor = ExecutorActor(transport, lambda: runner)
    to_executor, from_executor = transport.outbox("executor"), transport.inbox("scheduler")
    task = asyncio.create_task(executor.run())
    try:
        assert isinstance(await asyncio.wait_for(from_executor.recv(), 30), ExecutorReady)
        if hold_first:
            runner.gate.clear()
        for step_id in step_ids:
            to_executor.send(StepPlan(step=StepInput(step_id=step_id)))
        await asyncio.sleep(0.1)  # every plan is in the worker's queue
        runner.gate.set()
        got = []
        while len(got) < len(step_ids):
            got.append(await asyncio.wait_for(from_executor.recv(), 5))
        return got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def summary(messages) -> list[tuple[str, int]]:
    return [
        ("result", m.output.step_id) if isinstance(m, StepResult) else ("failed", m.step_id)
        for m in messages
    ]


async def test_a_waiting_plan_collects_the_step_before_it():
    runner = LaunchRunner()
    got = await run_steps(runner, [0, 1, 2])
    assert summary(got) == [("result", 0), ("result", 1), ("result", 2)]
    assert runner.collected_by == {0: "launch 1", 1: "launch 2", 2: "flush"}
    assert runner.flushes == 1


async def test_a_lone_step_is_collected_at_once():
    runner = LaunchRunner()
    got = await run_steps(runner, [0], hold_first=False)
    assert summary(got) == [("result", 0)] and runner.collected_by == {0: "flush"}


async def test_a_failed_launch_keeps_the_good_step_before_it():
    runner = LaunchRunner(fail_launch={1})
    got = await run_steps(runner, [0, 1, 2])
    assert summary(got) == [("result", 0), ("failed", 1), ("result", 2)]
    assert "forward fault" in got[1].message


async def test_a_failed_collect_fails_that_step_and_the_one_built_on_it():
    runner = LaunchRunner(fail_collect={0})
    got = await run_steps(runner, [0, 1, 2])
    assert summary(got) == [("failed", 0), ("failed", 1), ("result", 2)]
    assert "device fault" in got[0].message
