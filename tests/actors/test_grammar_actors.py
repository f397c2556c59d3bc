"""A grammar request waits for its compile without a slot; the executor compiles off the step.

The scheduler actor runs in-process against a scripted executor (FakeRunner steps, compiles
answered when the test says); the real executor actor runs with a stub runner whose grammar
cache compiles on a toy vocabulary.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest_asyncio
import xgrammar as xgr

from actors.executor import ExecutorActor
from actors.protocol import (
    Abort,
    CompileGrammar,
    ExecutorReady,
    GrammarFailed,
    GrammarReady,
    ReleaseGrammars,
    RequestError,
    SchedulerStats,
    StepPlan,
    StepResult,
    StepTokens,
)
from actors.scheduler.actor import SchedulerActor
from actors.transport import InProcessTransport
from model_runner import grammar_cache
from model_runner.grammar_cache import GrammarCache, GrammarCacheStats
from model_runner.sampling_params import GrammarSpec
from model_runner.step_input import StepInput, StepOutput
from tests.scheduler.fake_runner import Config, FakeRunner, counter_tokens, request

SPEC = GrammarSpec(kind="regex", spec="[0-9]+")
STATS = GrammarCacheStats(compiles=1, compile_seconds=0.5)


class ScriptedExecutor:
    """Steps with a FakeRunner; compiles are held until `answer` is called."""

    def __init__(self, transport: InProcessTransport) -> None:
        self.inbox = transport.inbox("executor")
        self.scheduler = transport.outbox("scheduler")
        self.runner = FakeRunner(64, 4, counter_tokens())
        self.compiles: list[CompileGrammar] = []
        self.released: list[str] = []
        self.steps = 0

    async def run(self) -> None:
        self.scheduler.send(
            ExecutorReady(num_blocks=64, block_size=4, max_model_len=64, vocab_size=500,
                          eos_token_ids=[0])
        )  # fmt: skip
        while True:
            msg = await self.inbox.recv()
            match msg:
                case StepPlan(step=step):
                    self.steps += 1
                    await asyncio.sleep(0.001)
                    self.scheduler.send(StepResult(output=self.runner.execute(step)))
                case CompileGrammar():
                    self.compiles.append(msg)
                case ReleaseGrammars(request_ids=ids):
                    self.released.extend(ids)

    def answer(self, request_id: str, ok: bool = True) -> None:
        if ok:
            self.scheduler.send(GrammarReady(request_id=request_id, cached=False, stats=STATS))
        else:
            self.scheduler.send(
                GrammarFailed(request_id=request_id, status=400, message="Invalid grammar: x",
                              code="invalid_grammar", stats=STATS)
            )  # fmt: skip


class Harness:
    def __init__(self) -> None:
        self.transport = InProcessTransport()
        self.scheduler = SchedulerActor(self.transport, Config(max_num_seqs=4))
        self.executor = ScriptedExecutor(self.transport)
        self.to_scheduler = self.transport.outbox("scheduler")
        self.detok = self.transport.inbox("detokenizer")
        self.api = self.transport.inbox("api")
        self.finished: dict[str, str] = {}
        self.errors: dict[str, RequestError] = {}
        self.stats: SchedulerStats | None = None
        self.tasks = [
            asyncio.create_task(self.scheduler.run()),
            asyncio.create_task(self.executor.run()),
            asyncio.create_task(self._drain()),
        ]

    async def _drain(self) -> None:
        async def detok():
            while True:
                tokens: StepTokens = await self.detok.recv()
                for out in tokens.outputs:
                    if out.finish_reason is not None:
                        self.finished[out.request_id] = out.finish_reason

        async def api():
            while True:
                msg = await self.api.recv()
                if isinstance(msg, RequestError):
                    self.errors[msg.request_id] = msg
                elif isinstance(msg, SchedulerStats):
                    self.stats = msg

        await asyncio.gather(detok(), api())

    async def until(self, condition, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="function")  # NOTE: the test's own loop
async def harness():
    h = Harness()
    yield h
    await h.close()


async def test_plain_requests_run_while_a_grammar_compiles(harness):
    h = harness
    h.to_scheduler.send(request("g", [1, 2, 3], grammar=SPEC, max_tokens=4))
    await h.until(lambda: h.executor.compiles)
    assert h.executor.compiles[0].grammar == SPEC
    h.to_scheduler.send(request("p", [4, 5, 6], max_tokens=6))
    await h.until(lambda: "p" in h.finished)
    assert "g" not in h.finished and h.stats.num_waiting == 0  # it holds no slot
    h.executor.answer("g")
    await h.until(lambda: "g" in h.finished)
    assert h.finished == {"p": "length", "g": "length"}
    await h.until(lambda: h.executor.released == ["g"])
    assert h.stats.grammar == STATS


async def test_a_failed_compile_refuses_the_request_with_a_400(harness):
    h = harness
    h.to_scheduler.send(request("bad", [1, 2], grammar=SPEC))
    await h.until(lambda: h.executor.compiles)
    h.executor.answer("bad", ok=False)
    await h.until(lambda: "bad" in h.errors)
    error = h.errors["bad"]
    assert (error.status, error.code, error.type) == (400, "invalid_grammar", "BadRequestError")
    assert h.executor.steps == 0 and h.executor.released == []


async def test_an_abort_while_compiling_releases_and_ignores_the_late_answer(harness):
    h = harness
    h.to_scheduler.send(request("gone", [1, 2], grammar=SPEC))
    await h.until(lambda: h.executor.compiles)
    h.to_scheduler.send(Abort(request_id="gone"))
    await h.until(lambda: h.executor.released == ["gone"])
    h.executor.answer("gone")
    h.to_scheduler.send(request("after", [7, 8], max_tokens=2))
    await h.until(lambda: "after" in h.finished)
    assert "gone" not in h.finished and h.executor.steps > 0
    assert h.stats.num_running == h.stats.num_waiting == 0


async def test_a_request_that_can_never_fit_is_refused_before_compiling(harness):
    h = harness
    h.to_scheduler.send(request("huge", list(range(1, 70)), grammar=SPEC))
    await h.until(lambda: "huge" in h.errors)
    assert h.errors["huge"].status == 400 and h.executor.compiles == []


# --- the real executor actor ------------------------------------------------------------


def toy_runner(step_seconds: float = 0.0) -> SimpleNamespace:
    """The runner's launch/flush contract: launching a step collects the one before it."""
    vocab = ["</s>", "0", "1", "2", "a", "b"]
    cache = GrammarCache(lambda: xgr.TokenizerInfo(vocab, stop_token_ids=[0]), compile_threads=1)
    in_flight: list[int] = []

    def flush() -> None:
        while in_flight:
            runner.on_output(StepOutput(step_id=in_flight.pop()))

    def launch(step: StepInput) -> None:
        time.sleep(step_seconds)
        flush()
        in_flight.append(step.step_id)

    runner = SimpleNamespace(
        num_blocks=8, block_size=4, max_model_len=32, vocab_size=len(vocab),
        eos_token_ids=[0], grammars=cache, launch=launch, flush=flush, on_output=None,
        max_verify_tokens=0,
    )  # fmt: skip
    return runner


async def test_the_executor_compiles_while_a_step_runs():
    transport = InProcessTransport()
    executor = ExecutorActor(transport, lambda: toy_runner(step_seconds=0.5))
    to_executor, from_executor = transport.outbox("executor"), transport.inbox("scheduler")
    task = asyncio.create_task(executor.run())
    try:
        assert isinstance(await asyncio.wait_for(from_executor.recv(), 30), ExecutorReady)
        to_executor.send(StepPlan(step=StepInput(step_id=0)))
        to_executor.send(CompileGrammar(request_id="g", grammar=SPEC))
        first = await asyncio.wait_for(from_executor.recv(), 5)
        second = await asyncio.wait_for(from_executor.recv(), 5)
        assert isinstance(first, GrammarReady) and not first.cached
        assert isinstance(second, StepResult) and second.output.step_id == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_executor_times_a_compile_out_and_caches_it_when_it_ends(monkeypatch):
    real = grammar_cache.compile_spec

    def slow(compiler, spec):
        time.sleep(0.6)
        return real(compiler, spec)

    monkeypatch.setattr(grammar_cache, "compile_spec", slow)
    transport = InProcessTransport()
    runner = toy_runner()
    executor = ExecutorActor(transport, lambda: runner, structured_outputs_timeout=0.2)
    to_executor = transport.outbox("executor")
    from_executor = transport.inbox("scheduler")
    task = asyncio.create_task(executor.run())
    try:
        assert isinstance(await asyncio.wait_for(from_executor.recv(), 30), ExecutorReady)
        to_executor.send(CompileGrammar(request_id="slow", grammar=SPEC))
        failed = await asyncio.wait_for(from_executor.recv(), 5)
        assert isinstance(failed, GrammarFailed) and failed.code == "grammar_compile_timeout"
        assert "--structured-outputs-timeout" in failed.message and failed.status == 400
        await asyncio.sleep(0.8)  # the compile finished in its thread
        to_executor.send(CompileGrammar(request_id="again", grammar=SPEC))
        ready = await asyncio.wait_for(from_executor.recv(), 5)
        assert isinstance(ready, GrammarReady) and ready.cached
        assert ready.stats.compiles == 1 and ready.stats.cache_hits == 1
        to_executor.send(ReleaseGrammars(request_ids=["again"]))
        monkeypatch.undo()
        to_executor.send(
            CompileGrammar(request_id="broken", grammar=GrammarSpec(kind="regex", spec="("))
        )
        failed = await asyncio.wait_for(from_executor.recv(), 5)
        assert isinstance(failed, GrammarFailed) and failed.code == "invalid_grammar"
        assert runner.grammars._pins == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
