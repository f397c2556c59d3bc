"""The scheduler actor: wraps the pure-Python `Scheduler` policy in a message loop.

Exactly one step is in flight: a StepPlan goes to the executor, its StepResult comes back,
the policy updates, the step's tokens go to the detokenizer, and the next step is planned.
"""

from __future__ import annotations

import msgspec

from actors.actor import Actor
from actors.protocol import (
    Abort,
    EngineReady,
    ExecutorReady,
    PrefixCacheReset,
    RequestError,
    ResetPrefixCache,
    StepFailed,
    StepPlan,
    StepResult,
    StepTokens,
    TokenizedRequest,
)
from actors.scheduler.errors import AdmissionError
from actors.scheduler.scheduler import Scheduler
from actors.transport import Transport


class SchedulerActor(Actor):
    name = "scheduler"

    def __init__(self, transport: Transport, config) -> None:
        super().__init__(transport)
        self.config = config
        self.policy: Scheduler | None = None
        self.step_in_flight = False
        self.pending: list[TokenizedRequest] = []  # arrived before the executor was ready
        self.executor = transport.outbox("executor")
        self.detokenizer = transport.outbox("detokenizer")
        self.api = transport.outbox("api")

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case TokenizedRequest():
                if self.policy is None:
                    self.pending.append(msg)
                else:
                    self.admit(msg)
            case Abort(request_id=rid, index=index, reason=reason):
                if self.policy is not None:
                    self.policy.abort(rid, index, reason)
                else:
                    self.pending = [r for r in self.pending if r.request_id != rid]
            case StepResult(output=output):
                self.step_in_flight = False
                self.emit(self.policy.update(output))
            case StepFailed(step_id=step_id):
                self.step_in_flight = False
                self.emit(self.policy.fail_step(step_id))
            case ExecutorReady():
                self.on_executor_ready(msg)
            case ResetPrefixCache():
                ok = self.policy is not None and self.policy.reset_prefix_cache()
                self.api.send(PrefixCacheReset(ok=ok))
        self.plan_next_step()

    def on_executor_ready(self, ready: ExecutorReady) -> None:
        self.policy = Scheduler(
            self.config,
            num_blocks=ready.num_blocks,
            block_size=ready.block_size,
            max_model_len=ready.max_model_len,
            eos_token_ids=ready.eos_token_ids,
        )
        pending, self.pending = self.pending, []
        self.api.send(
            EngineReady(
                num_blocks=ready.num_blocks,
                block_size=ready.block_size,
                max_model_len=ready.max_model_len,
                vocab_size=ready.vocab_size,
            )
        )
        for req in pending:
            self.admit(req)

    def admit(self, req: TokenizedRequest) -> None:
        try:
            self.policy.add_request(req)
        except AdmissionError as e:
            self.api.send(
                RequestError(
                    request_id=req.request_id,
                    status=e.status,
                    message=e.message,
                    type="ServiceUnavailableError" if e.status == 503 else "BadRequestError",
                    param=e.param,
                    code=e.code,
                    retry_after=e.retry_after,
                )
            )

    def emit(self, tokens: StepTokens) -> None:
        if tokens.outputs or tokens.started:
            self.detokenizer.send(tokens)

    def plan_next_step(self) -> None:
        if self.policy is None or self.step_in_flight:
            return
        step = self.policy.schedule()
        # NOTE: after schedule(): it may itself finish a sequence that can never grow.
        self.emit(self.policy.take_finished_aborts())
        if step is not None:
            self.executor.send(StepPlan(step=step))
            self.step_in_flight = True
        self.api.send(self.policy.stats())
