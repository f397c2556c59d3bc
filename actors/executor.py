"""The executor actor: owns the model runner (and the GPU); one step at a time.

The step runs in a worker thread of its own and grammars compile in a pool beside it; the
actor loop keeps reading its inbox while both run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import msgspec

from actors.actor import Actor
from actors.protocol import (
    CompileGrammar,
    ExecutorFailed,
    ExecutorReady,
    GrammarFailed,
    GrammarReady,
    LoraAdapterRead,
    ReadLoraAdapter,
    ReleaseGrammars,
    StepFailed,
    StepPlan,
    StepResult,
)
from actors.transport import Transport
from model_runner.config import EngineConfigError
from model_runner.grammar_cache import GrammarError
from model_runner.lora_adapter import LoraAdapterError
from model_runner.sampling_params import GrammarSpec
from model_runner.step_flight import CollectFailed
from model_runner.step_input import StepOutput

log = logging.getLogger(__name__)

GRAMMAR_COMPILE_WORKERS = 2


class ExecutorActor(Actor):
    """Loads the model in `start`, then runs each StepPlan in a dedicated worker thread.

    NOTE: the step runs off the event loop so heartbeats and messages keep flowing; torch
    releases the GIL inside its kernels, xgrammar inside its compiles.
    """

    name = "executor"

    def __init__(
        self,
        transport: Transport,
        runner_factory,
        structured_outputs_timeout: float = 10.0,
        compile_niceness: int = 5,
    ) -> None:
        super().__init__(transport)
        self.runner_factory = runner_factory
        self.runner = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-step")
        self.compile_pool = ThreadPoolExecutor(
            max_workers=GRAMMAR_COMPILE_WORKERS,
            thread_name_prefix="grammar-compile",
            initializer=_lower_thread_priority,
            initargs=(compile_niceness,),
        )
        self.compile_timeout = structured_outputs_timeout
        self.compiles: dict[str, asyncio.Task] = {}
        self.lora_reads: set[asyncio.Task] = set()
        self.step_task: asyncio.Task | None = None
        self.plans_waiting = 0  # StepPlans received whose launch has not returned
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = transport.outbox("scheduler")

    async def start(self) -> None:
        """Load the model; a setting it cannot serve is reported (ExecutorFailed), not raised.

        NOTE: after a failed start the actor waits, sending nothing, until its process is
        stopped: the API prints the reason once and stops the engine itself (a process that
        exited at once could drop the message, and would look like a crash).
        """
        loop = asyncio.get_running_loop()
        try:
            self.runner = await loop.run_in_executor(self.worker, self.runner_factory)
        except EngineConfigError as e:
            log.debug("the engine cannot start", exc_info=True)
            self.scheduler.send(ExecutorFailed(message=str(e)))
            await asyncio.Event().wait()
        r = self.runner
        self.loop = loop
        r.on_output = self._send_output
        self.scheduler.send(
            ExecutorReady(
                num_blocks=r.num_blocks,
                block_size=r.block_size,
                max_model_len=r.max_model_len,
                vocab_size=r.vocab_size,
                eos_token_ids=list(r.eos_token_ids),
                max_verify_tokens=r.max_verify_tokens,
            )
        )
        warm_up = loop.run_in_executor(self.compile_pool, lambda: r.grammars.compiler)
        warm_up.add_done_callback(_log_warm_up_failure)

    def open_requests(self) -> int:
        """Grammar compiles under way, and requests whose compiled grammar is pinned.
        NOTE: the runner's sequence states are not counted: finished ones are dropped with
        the next step, so an idle runner may still hold the last step's."""
        pinned = self.runner.grammars.num_pinned() if self.runner is not None else 0
        return len(self.compiles) + pinned

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case StepPlan(step=step):
                # NOTE: up to two steps in flight (overlap); the one worker thread launches them
                # in order, and launching N+1 collects N, so results go back in order. The
                # inbox stays open meanwhile: a CompileGrammar starts during a step.
                self.plans_waiting += 1
                self.step_task = asyncio.create_task(self.run_step(step))
            case CompileGrammar(request_id=rid, grammar=spec):
                self.compiles[rid] = asyncio.create_task(self.compile(rid, spec))
            case ReadLoraAdapter(request_id=rid, key=key, path=path):
                task = asyncio.create_task(self.read_lora(rid, key, path))
                self.lora_reads.add(task)  # NOTE: a reference, so the task is not collected
                task.add_done_callback(self.lora_reads.discard)
            case ReleaseGrammars(request_ids=request_ids):
                for rid in request_ids:
                    if (task := self.compiles.pop(rid, None)) is not None:
                        task.cancel()
                    self.runner.grammars.unpin(rid)

    async def run_step(self, step) -> None:
        """Launch the step; collect it at once unless a later plan is waiting, whose launch
        collects it (the device is then never idle between the two)."""
        loop = asyncio.get_running_loop()
        failed = await loop.run_in_executor(self.worker, self._launch, step)
        self.plans_waiting -= 1
        if not failed and self.plans_waiting == 0:
            # NOTE: submitted before any later plan's launch: the worker runs them in order
            failed = await loop.run_in_executor(self.worker, self._flush)
        for step_id, message in failed:
            self.scheduler.send(StepFailed(step_id=step_id, message=message))

    def _launch(self, step) -> list[tuple[int, str]]:
        """In the step thread: (step id, reason) of each step that failed, in order. After a
        failure the step still in flight is collected (its output is good)."""
        try:
            self.runner.launch(step)
            return []
        except CollectFailed as e:
            log.exception("step %d failed", e.step_id)
            failed = [(e.step_id, repr(e.__cause__)), (step.step_id, "the step before it failed")]
        except Exception as e:
            tp = getattr(self.runner, "tp", None)
            if tp is not None and tp.enabled:  # NOTE: the ranks are out of lockstep
                from actors.rank_executor import exit_lockstep_lost

                exit_lockstep_lost(0, step.step_id)
            log.exception("step %d failed", step.step_id)
            failed = [(step.step_id, repr(e))]
        return self._flush() + failed

    def _flush(self) -> list[tuple[int, str]]:
        try:
            self.runner.flush()
            return []
        except CollectFailed as e:
            log.exception("step %d failed", e.step_id)
            return [(e.step_id, repr(e.__cause__))]

    def _send_output(self, output: StepOutput) -> None:
        """The runner's `on_output`, called in the step thread: sent from the loop, in order."""
        self.loop.call_soon_threadsafe(self.scheduler.send, StepResult(output=output))

    async def read_lora(self, request_id: str, key: str, path: str) -> None:
        """In the step thread (between steps: the runner's adapter cache is not shared)."""
        loop, error = asyncio.get_running_loop(), None
        try:
            await loop.run_in_executor(self.worker, self.runner.read_lora_adapter, key, path)
        except LoraAdapterError as e:
            error = str(e)
        except Exception as e:  # NOTE: an unexpected read failure refuses the load only
            log.exception("reading LoRA adapter %s failed", path)
            error = f"LoRA adapter {path!r} cannot be read: {e!r}"
        self.scheduler.send(LoraAdapterRead(request_id=request_id, error=error))

    async def compile(self, request_id: str, spec: GrammarSpec) -> None:
        """Compile in the pool; answer GrammarReady (pinned) or GrammarFailed.

        NOTE: a compile past the timeout fails its request but runs on in its thread (it
        cannot be interrupted) and is cached when done; a released request gets no answer.
        """
        grammars = self.runner.grammars
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.compile_pool, grammars.compile, spec)
        future.add_done_callback(_retrieve)  # NOTE: a compile nobody waits for may still fail
        try:
            _, cached = await asyncio.wait_for(asyncio.shield(future), self.compile_timeout)
        except asyncio.TimeoutError:
            self._fail(
                request_id,
                400,
                f"The grammar did not compile within {self.compile_timeout:g} s "
                "(--structured-outputs-timeout).",
                "grammar_compile_timeout",
            )
        except GrammarError as e:
            self._fail(request_id, 400, f"Invalid grammar: {e}", "invalid_grammar")
        except Exception:  # the compiler itself could not be built (no tokenizer, ...)
            log.exception("grammar compile failed")
            self._fail(request_id, 500, "Structured output is unavailable.", "grammar")
        else:
            grammars.pin(request_id, spec)
            self.scheduler.send(
                GrammarReady(request_id=request_id, cached=cached, stats=grammars.stats())
            )
        finally:
            if self.compiles.get(request_id) is asyncio.current_task():
                del self.compiles[request_id]

    def _fail(self, request_id: str, status: int, message: str, code: str) -> None:
        self.scheduler.send(
            GrammarFailed(
                request_id=request_id,
                status=status,
                message=message,
                code=code,
                stats=self.runner.grammars.stats(),
            )
        )


def _lower_thread_priority(niceness: int) -> None:
    """Compiles yield the CPU to the model step: a nicer thread (Linux niceness is per
    thread), so decoding keeps its pace while a large grammar compiles.

    NOTE: EngineConfig.grammar_compile_niceness, 5 by default: on a shared 2-core machine,
    10 starved a 64-tool compile past the 10 s timeout; at 5 the scheduler's weights give a
    compile about a quarter of a core while both cores decode.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not allowed: compile at normal priority
        pass


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


def _log_warm_up_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("grammar compiler not built at start: %r", future.exception())
