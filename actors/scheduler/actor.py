"""The scheduler actor: wraps the pure-Python `Scheduler` policy in a message loop.

A StepPlan goes to the executor, its StepResult comes back, the policy updates, the step's
tokens go to the detokenizer. With overlap (`EngineConfig.async_scheduling`, on by default)
step N+1 is planned and sent as soon as step N is, so the executor starts it the moment N
is done; then each result plans the step after the one running (two in flight at most; see
actors/scheduler/overlap.py). Without it one step is in flight.

A request with a grammar first passes the admission checks, then waits outside the policy
(no slot, no blocks) while the executor compiles its grammar; GrammarReady queues it,
GrammarFailed refuses it. When it finishes, ReleaseGrammars unpins its grammar.
"""

from __future__ import annotations

import msgspec

from actors.actor import Actor
from actors.protocol import (
    Abort,
    CompileGrammar,
    Drain,
    EngineFailed,
    EngineReady,
    ExecutorFailed,
    ExecutorReady,
    GrammarFailed,
    GrammarReady,
    LoadLoraAdapter,
    LoraAdapterRead,
    LoraAdapterUpdated,
    PrefixCacheReset,
    ReadLoraAdapter,
    ReleaseGrammars,
    RequestError,
    ResetPrefixCache,
    StepFailed,
    StepPlan,
    StepResult,
    StepTokens,
    TokenizedRequest,
    UnloadLoraAdapter,
    rank_executor_name,
)
from actors.scheduler.errors import AdmissionError
from actors.scheduler.overlap import MAX_STEPS_IN_FLIGHT
from actors.scheduler.scheduler import Scheduler
from actors.transport import Transport
from model_runner.grammar_cache import GrammarCacheStats

_plan_encoder = msgspec.msgpack.Encoder()

SHUTTING_DOWN = AdmissionError(
    503, "The server is shutting down.", code="shutting_down", retry_after=1.0
)


class SchedulerActor(Actor):
    name = "scheduler"

    def __init__(self, transport: Transport, config) -> None:
        super().__init__(transport)
        self.config = config
        self.policy: Scheduler | None = None
        overlap = getattr(config, "async_scheduling", False)
        self.max_steps_in_flight = MAX_STEPS_IN_FLIGHT if overlap else 1
        self.pending: list[TokenizedRequest] = []  # arrived before the executor was ready
        self.compiling: dict[str, TokenizedRequest] = {}  # waiting for their grammar
        self.releases: list[str] = []  # grammars to unpin, sent with the next plan
        self.grammar_stats: GrammarCacheStats | None = None
        self.grammar_stats_changed = False
        self.draining = False
        self.lora_loads: dict[str, tuple[str, str, str]] = {}  # request id -> name, key, path
        self.loading_loras: dict[str, str] = {}  # adapter name -> its load's request id
        self.executor = transport.outbox("executor")
        # Tensor parallel: every rank gets every StepPlan, in the same order.
        ranks = getattr(config, "tensor_parallel_size", 1)
        self.rank_executors = [transport.outbox(rank_executor_name(r)) for r in range(1, ranks)]
        self.detokenizer = transport.outbox("detokenizer")
        self.api = transport.outbox("api")

    async def handle(self, msg: msgspec.Struct) -> None:
        match msg:
            case TokenizedRequest():
                if self.policy is None and not self.draining:
                    self.pending.append(msg)
                else:
                    self.admit(msg)
            case Abort(request_id=rid, index=index, reason=reason):
                self.abort(rid, index, reason)
            case StepResult(output=output):
                self.emit(self.policy.update(output))
            case StepFailed(step_id=step_id):
                self.emit(self.policy.fail_step(step_id))
            case GrammarReady(request_id=rid, stats=stats):
                self.grammar_stats, self.grammar_stats_changed = stats, True
                if (req := self.compiling.pop(rid, None)) is not None:
                    self.enqueue(req)
            case GrammarFailed(request_id=rid, stats=stats):
                self.grammar_stats, self.grammar_stats_changed = stats, True
                if self.compiling.pop(rid, None) is not None:
                    self.refuse(rid, AdmissionError(msg.status, msg.message, code=msg.code))
            case ExecutorReady():
                self.on_executor_ready(msg)
            case ExecutorFailed(message=message):
                self.api.send(EngineFailed(message=message))
            case Drain():
                self.drain()
            case LoadLoraAdapter():
                self.load_lora(msg)
            case UnloadLoraAdapter(request_id=rid, lora_name=name):
                found = self.policy is not None and self.policy.loras.unregister(name)
                self.api.send(LoraAdapterUpdated(
                    request_id=rid, status=200 if found else 404,
                    message=f"Success: LoRA adapter '{name}' removed successfully." if found
                    else f"The LoRA adapter '{name}' cannot be found.",
                ))  # fmt: skip
            case LoraAdapterRead(request_id=rid, error=error):
                self.lora_read(rid, error)
            case ResetPrefixCache():
                ok = self.policy is not None and self.policy.reset_prefix_cache()
                self.api.send(PrefixCacheReset(ok=ok))
        self.plan_next_step()

    def load_lora(self, msg: LoadLoraAdapter) -> None:
        """Have the executor read and check the adapter; it is servable once it answers."""
        name, reply = msg.lora_name, None
        if self.policy is None:
            reply = (503, "The engine is still starting.")
        elif self.policy.loras.lookup(name) is not None or name in self.loading_loras:
            reply = (400, f"The LoRA adapter '{name}' has already been loaded.")
        if reply is not None:
            self.api.send(LoraAdapterUpdated(
                request_id=msg.request_id, status=reply[0], message=reply[1]
            ))  # fmt: skip
            return
        key = self.policy.loras.next_key(name)
        self.loading_loras[name] = msg.request_id
        self.lora_loads[msg.request_id] = (name, key, msg.lora_path)
        self.executor.send(ReadLoraAdapter(request_id=msg.request_id, key=key, path=msg.lora_path))

    def lora_read(self, request_id: str, error: str | None) -> None:
        pending = self.lora_loads.pop(request_id, None)
        if pending is None:
            return
        name, key, path = pending
        del self.loading_loras[name]
        if error is None:
            self.policy.loras.register(name, key, path)
            status, message = 200, f"Success: LoRA adapter '{name}' added successfully."
        else:
            status, message = 400, error
        self.api.send(LoraAdapterUpdated(request_id=request_id, status=status, message=message))

    def open_requests(self) -> int:
        """Requests waiting for the executor, compiling their grammar, queued or running."""
        queued = self.policy.num_requests() if self.policy is not None else 0
        return len(self.pending) + len(self.compiling) + queued

    def on_executor_ready(self, ready: ExecutorReady) -> None:
        self.policy = Scheduler(
            self.config,
            num_blocks=ready.num_blocks,
            block_size=ready.block_size,
            max_model_len=ready.max_model_len,
            eos_token_ids=ready.eos_token_ids,
            max_verify_tokens=ready.max_verify_tokens,
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
        """Queue a request, or first have its grammar compiled (it waits without a slot)."""
        grammar = req.sampling.grammar
        if self.draining:
            self.refuse(req.request_id, SHUTTING_DOWN)
            return
        try:
            if grammar is None:
                self.policy.add_request(req)
                return
            if req.request_id in self.compiling:
                raise AdmissionError(
                    400, f"Request id {req.request_id!r} is already in use.",
                    code="duplicate_request_id",
                )  # fmt: skip
            self.policy.check_request(req)
        except AdmissionError as e:
            self.refuse(req.request_id, e)
            return
        self.compiling[req.request_id] = req
        self.executor.send(CompileGrammar(request_id=req.request_id, grammar=grammar))

    def enqueue(self, req: TokenizedRequest) -> None:
        """Its grammar is compiled: queue it (the queue may have filled meanwhile)."""
        try:
            self.policy.add_request(req)
        except AdmissionError as e:
            self.releases.append(req.request_id)
            self.refuse(req.request_id, e)

    def abort(self, request_id: str, index: int | None, reason: str) -> None:
        if self.compiling.pop(request_id, None) is not None:
            self.releases.append(request_id)
        elif self.policy is not None:
            self.policy.abort(request_id, index, reason)
        else:
            self.pending = [r for r in self.pending if r.request_id != request_id]

    def drain(self) -> None:
        """Shutting down: requests waiting for a grammar or a slot end "abort"; new ones 503."""
        self.draining = True
        for rid in list(self.compiling):
            self.abort(rid, None, "abort")
            self.refuse(rid, SHUTTING_DOWN)
        for req in self.pending:
            self.refuse(req.request_id, SHUTTING_DOWN)
        self.pending = []
        if self.policy is not None:
            self.policy.drain()

    def refuse(self, request_id: str, e: AdmissionError) -> None:
        self.api.send(
            RequestError(
                request_id=request_id,
                status=e.status,
                message=e.message,
                type=e.type,
                param=e.param,
                code=e.code,
                retry_after=e.retry_after,
            )
        )

    def emit(self, tokens: StepTokens) -> None:
        if tokens.outputs or tokens.started:
            self.detokenizer.send(tokens)

    def plan_next_step(self) -> None:
        if self.policy is None:
            return
        # NOTE: before the next StepPlan, so the executor never unpins a grammar late.
        self.releases.extend(self.policy.take_finished_grammars())
        if self.releases:
            self.executor.send(ReleaseGrammars(request_ids=self.releases))
            self.releases = []
        planned = False
        while self.policy.num_steps_in_flight < self.max_steps_in_flight:
            step = self.policy.schedule()
            # NOTE: after schedule(): it may itself finish a sequence that can never grow.
            self.emit(self.policy.take_finished_aborts())
            planned = True
            if step is None:
                break
            self.send_plan(StepPlan(step=step))
        if planned or self.grammar_stats_changed:  # NOTE: compile counters need not wait
            self.send_stats()

    def send_plan(self, plan: StepPlan) -> None:
        """To rank 0's executor and, encoded once, to every other rank's."""
        if not self.rank_executors:
            self.executor.send(plan)
            return
        data = _plan_encoder.encode(plan)
        for outbox in (self.executor, *self.rank_executors):
            outbox.send_bytes(data)

    def send_stats(self) -> None:
        stats = self.policy.stats()
        if self.grammar_stats is not None:
            stats = msgspec.structs.replace(stats, grammar=self.grammar_stats)
        self.api.send(stats)
        self.grammar_stats_changed = False
