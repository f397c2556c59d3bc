"""The scheduling policy: continuous batching over a paged KV cache, pure Python.

`schedule()` plans a step, the runner executes it, `update()` takes its sampled tokens. With
overlap a second step is planned while the first runs (actors/scheduler/overlap.py): its
rows may take the token the first samples (placeholders), learnt one step later.

Each step first continues the running sequences in order (decodes, then the rest of chunked
prefills), then admits waiting ones (FCFS) into what is left of the token budget
(actors/scheduler/planning.py). When blocks run out, the newest running sequence is preempted by
recompute (it frees its blocks and goes back to the front of the waiting queue).

Samples of n > 1: sample 0 prefills the prompt; when the prompt is computed the others fork
from it, sharing all its blocks, and recompute only the last prompt token (each draws its
own first token); writes into shared blocks are copied on write (`StepInput.block_copies`).
"""

from __future__ import annotations

from collections import deque

from actors.protocol import DetokParams, SchedulerStats, SeqOutput, StepTokens, TokenizedRequest
from actors.scheduler.admission import check_admission, effective_max_tokens
from actors.scheduler.block_manager import BlockManager
from actors.scheduler.cost import CostLedger
from actors.scheduler.errors import AdmissionError
from actors.scheduler.finishing import check_stop, detok_params
from actors.scheduler.lora_slots import LoraRegistry
from actors.scheduler.overlap import MAX_STEPS_IN_FLIGHT, InFlightStep
from actors.scheduler.plan import Plan
from actors.scheduler.planning import schedule_running, schedule_waiting
from actors.scheduler.prefix_cache import PrefixCache
from actors.scheduler.prefix_hash import extra_keys
from actors.scheduler.sequence import Request, SeqStatus, Sequence, sample_seq_ids
from actors.scheduler.speculation import Speculation
from model_runner.step_input import StepInput, StepOutput

WAITING, RUNNING = SeqStatus.WAITING, SeqStatus.RUNNING
FORK_PENDING, FINISHED = SeqStatus.FORK_PENDING, SeqStatus.FINISHED


class Scheduler:
    """Plans steps and tracks requests; see the module docstring.

    `config` is duck-typed: max_num_seqs, max_num_batched_tokens, enable_prefix_caching
    and max_waiting are read from it; the KV geometry and max_model_len come from the runner.
    """

    def __init__(
        self,
        config,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: list[int],
        max_verify_tokens: int = 0,
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_waiting = getattr(config, "max_waiting", 1024)
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        caching = getattr(config, "enable_prefix_caching", True)
        self.blocks = BlockManager(num_blocks, block_size, caching)
        self.prefix_cache = PrefixCache(self.blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # NOTE: oldest first; preemption pops the newest
        self._requests: dict[str, Request] = {}
        self._seqs: dict[str, Sequence] = {}
        self._in_flight: deque[InFlightStep] = deque()  # oldest first
        self.sync_next = False  # the next step waits until no step is in flight
        self._next_step_id = 0
        # NOTE: the fields below are shared with planning.py.
        self.finished_ids: list[str] = []  # for the next StepInput.finished_seq_ids
        self._started: list[DetokParams] = []
        self._outputs: list[SeqOutput] = []
        self.preemptions = 0
        self._grammar_done: list[str] = []  # finished requests whose grammar can be unpinned
        self.costs = CostLedger()
        spec = getattr(config, "speculative_config", None)
        self.spec = (
            Speculation(spec, max_model_len, max_verify_tokens) if spec is not None else None
        )
        self.loras = LoraRegistry(
            getattr(config, "max_loras", 1) if getattr(config, "enable_lora", False) else 0,
            getattr(config, "lora_modules", ()),
        )

    # --- requests --------------------------------------------------------------------

    def check_request(self, req: TokenizedRequest) -> None:
        """Raise AdmissionError for what can never fit, a full queue, or an id in use."""
        rid, n = req.request_id, max(1, req.sampling.n)
        if rid in self._requests or any(s in self._seqs for s in sample_seq_ids(rid, n)):
            raise AdmissionError(
                400, f"Request id {rid!r} is already in use.", code="duplicate_request_id"
            )
        if req.lora_name is not None and self.loras.lookup(req.lora_name) is None:
            raise AdmissionError(
                404, f"The model `{req.lora_name}` does not exist.", param="model",
                code="model_not_found",
            )  # fmt: skip
        check_admission(
            len(req.prompt_token_ids),
            req.sampling.max_tokens,
            max_model_len=self.max_model_len,
            num_blocks=self.blocks.num_blocks,
            block_size=self.block_size,
            num_waiting=len(self.waiting),
            max_waiting=self.max_waiting,
        )

    def add_request(self, req: TokenizedRequest) -> None:
        """Queue a request; raise AdmissionError for what can never fit or a full queue."""
        self.check_request(req)
        prompt_len = len(req.prompt_token_ids)
        lora = self.loras.lookup(req.lora_name) if req.lora_name is not None else None
        # NOTE: the key carries the load generation: a reloaded adapter never hits old blocks.
        extra = extra_keys(req.cache_salt, lora[0] if lora is not None else None)
        max_tokens = effective_max_tokens(req.sampling.max_tokens, prompt_len, self.max_model_len)
        request = Request.with_samples(req, max_tokens, extra)
        request.lora = lora
        for seq in request.seqs:
            self._seqs[seq.seq_id] = seq
        self._requests[req.request_id] = request
        self.waiting.append(request.seqs[0])

    def abort(self, request_id: str, index: int | None = None, reason: str = "abort") -> None:
        """Finish a request's samples (index None: all); their blocks are freed at once, or
        when the in-flight step returns. Reported as SeqOutput(finish_reason=reason) by the
        next StepTokens, except for reason "stop" (the detokenizer asked: it knows)."""
        request = self._requests.get(request_id)
        if request is None:
            return
        targets = [s for s in request.seqs if s.status is not FINISHED and index in (None, s.index)]
        # NOTE: fork-pending samples first, so a dying leader promotes no heir needlessly.
        targets.sort(key=lambda s: s.status is not FORK_PENDING)
        for seq in targets:
            self.retire(seq)
            if reason != "stop":
                self.emit(seq, [], reason)

    def drain(self) -> None:
        """Shutting down: abort the waiting requests never started (the preempted go on).
        NOTE: the actor refuses new requests from then on."""
        never_started = [s for s in self.waiting if s.request.queue_seconds is None]
        for seq in never_started:
            self.abort(seq.request.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- steps -----------------------------------------------------------------------

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    def schedule(self) -> StepInput | None:
        """Plan the next step; None when there is nothing to compute. With a step in flight
        (overlap) it plans ahead, or returns None to wait for that step."""
        if len(self._in_flight) >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError("two steps are in flight: update() or fail_step() first")
        ahead = bool(self._in_flight)
        if ahead and self.sync_next:
            return None
        self.sync_next = False
        plan = Plan(self.max_num_batched_tokens)
        if self.spec is not None:
            self.spec.begin_step(len(self.running))
        preempted = schedule_running(self, plan, ahead)
        if not preempted or not plan.chunks:
            schedule_waiting(self, plan, ahead)
        if not plan.chunks:
            # NOTE: only when nothing is left: a lone sequence always runs or finishes.
            assert ahead or not self.has_unfinished
            return None
        step_id = self._next_step_id
        self._next_step_id += 1
        if self.spec is not None:
            self.spec.step += 1  # NOTE: the back-off's clock counts steps planned
        for seq, num_tokens in plan.scheduled:
            seq.in_flight += 1
            seq.num_scheduled += num_tokens
        for seq in plan.samplers:
            seq.num_pending += 1
        self._in_flight.append(InFlightStep(step_id, plan.scheduled, plan.samplers))
        finished, self.finished_ids = self.finished_ids, []
        return StepInput(
            step_id=step_id,
            new_sequences=plan.new_seqs,
            chunks=plan.chunks,
            finished_seq_ids=finished,
            block_copies=plan.copies,
            lora_loads=self.loras.take_loads(),
        )

    def update(self, output: StepOutput) -> StepTokens:
        """Take the oldest step's result: advance, fork, append tokens, finish, free.

        NOTE: samples are matched to the step's own sequences, not looked up by id: a
        finished sequence's id may already belong to a new request.
        """
        step = self._take_in_flight(output.step_id)
        if step is None:
            raise ValueError(f"step {output.step_id} is not the oldest step in flight")
        samplers = {seq.seq_id: seq for seq in step.samplers}
        by_seq: dict[str, list] = {}  # NOTE: a speculating sequence has several, in order
        for sampled in output.sampled:
            by_seq.setdefault(sampled.seq_id, []).append(sampled)
        kept = [
            (seq, tokens) for seq_id, tokens in by_seq.items()
            if (seq := samplers.get(seq_id)) is not None and seq.status is RUNNING
        ]  # fmt: skip
        # NOTE: proposals are computed tokens too; a discarded token (its sequence finished
        # the step before, or a stop came earlier in its run) is not counted as generated.
        computed = [(seq, n + seq.num_drafts) for seq, n in step.scheduled]
        self.costs.charge(computed, output.device_seconds)
        for seq, num_tokens in step.scheduled:
            if seq.status is FINISHED:  # aborted, or ended by the step before
                if not seq.in_flight:
                    self.blocks.free(seq.seq_id)
                continue
            seq.num_computed += num_tokens
            self.prefix_cache.register_computed(seq, num_tokens)
            if seq.forks and seq.num_computed >= seq.prompt_len:
                self._fork(seq)
        assert len(kept) == sum(s.status is RUNNING for s in step.samplers), "a sample is missing"
        any_finished = False
        for seq, tokens in kept:
            drafts, seq.num_drafts = seq.num_drafts, 0
            assert len(tokens) <= drafts + 1, "more tokens than a speculating row can return"
            before = seq.num_tokens
            finished = self._append_tokens(seq, tokens)
            self.costs.count_generated(seq.num_tokens - before)
            any_finished |= finished
            if drafts:
                self._accept_drafts(seq, drafts, len(tokens) - 1, finished)
        if any_finished:
            self.running = [s for s in self.running if s.status is RUNNING]
        return self.take_finished_aborts()

    def _accept_drafts(self, seq: Sequence, drafts: int, accepted: int, finished: bool) -> None:
        """A speculating row returned: its accepted proposals' K/V are computed; the blocks
        past them go back (rejected positions hold K/V of tokens never emitted)."""
        self.spec.record(seq, drafts, accepted)
        if finished:
            return
        seq.num_computed += accepted
        seq.num_scheduled += accepted
        self.prefix_cache.register_computed(seq, accepted)
        self.blocks.truncate(seq.seq_id, seq.num_computed)

    def fail_step(self, step_id: int) -> StepTokens:
        """The step raised: finish each of its sequences (and their pending forks) "error".
        A step planned after it still runs; what it computed for them is discarded."""
        step = self._take_in_flight(step_id)
        self.loras.resend_loads()  # NOTE: the runner may not have applied this step's loads
        if step is None:
            return self.take_finished_aborts()
        for seq, _ in step.scheduled:
            if seq.status is FINISHED:
                if not seq.in_flight:
                    self.blocks.free(seq.seq_id)
                continue
            for victim in [*seq.forks, seq]:
                self.retire(victim)
                self.emit(victim, [], "error")
        return self.take_finished_aborts()

    def _take_in_flight(self, step_id: int) -> InFlightStep | None:
        """Pop the oldest step in flight if it is `step_id` (results come back in order)."""
        if not self._in_flight or self._in_flight[0].step_id != step_id:
            return None
        step = self._in_flight.popleft()
        for seq, _ in step.scheduled:
            seq.in_flight -= 1
        for seq in step.samplers:
            seq.num_pending -= 1
        return step

    def take_finished_grammars(self) -> list[str]:
        """Ids of the requests with a grammar that finished since the last call."""
        done, self._grammar_done = self._grammar_done, []
        return done

    def take_finished_aborts(self) -> StepTokens:
        """Outputs not yet sent: aborts, errors, and anything finished outside update()."""
        tokens = StepTokens(started=self._started, outputs=self._outputs)
        self._started, self._outputs = [], []
        return tokens

    # --- stats and cache -------------------------------------------------------------

    def num_requests(self) -> int:
        """Requests admitted and not yet finished (waiting, running or preempted)."""
        return len(self._requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.blocks.usage,
            num_blocks_in_use=self.blocks.num_used_blocks,
            prefix_cache_queries=self.prefix_cache.queries,
            prefix_cache_hits=self.prefix_cache.hits,
            num_preemptions=self.preemptions,
            gpu_seconds_by_feature=self.costs.gpu_seconds_by_feature,  # NOTE: encoded at send
            prompt_tokens_computed=self.costs.prompt_tokens_computed,
            generation_tokens=self.costs.generation_tokens,
            iteration_tokens=self.costs.take_iteration_tokens(),
            spec=self.spec.stats() if self.spec is not None else None,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block not in use; blocks in use are no longer shared."""
        self.blocks.reset_prefix_cache()
        return True

    # --- results ---------------------------------------------------------------------

    def _fork(self, parent: Sequence) -> None:
        """Sample 0's prompt is computed: its pending samples share all its blocks."""
        for child in parent.forks:
            self.blocks.fork(parent.seq_id, child.seq_id)
            child.num_computed = child.num_scheduled = child.prompt_len - 1
            child.block_keys = parent.block_keys[: child.prompt_len // self.block_size]
            child.status = RUNNING
            child.fork_parent = None
            self.running.append(child)
        parent.forks = []

    def _append_tokens(self, seq: Sequence, sampled: list) -> bool:
        """Append a step's sampled tokens (several for a speculating row) up to the first
        that ends the sequence, emit them; returns whether the sequence finished."""
        token_ids, logprobs, reason, stop_reason = [], [], None, None
        for s in sampled:
            token = s.token_id
            seq.token_ids.append(token)
            token_ids.append(token)
            if s.logprob is not None:
                logprobs.append((token, s.logprob, list(s.top_logprobs or ())))
            reason, stop_reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                break
        self.emit(seq, token_ids, reason, stop_reason, logprobs or None)
        if reason is None:
            return False
        self.retire(seq, unlink=False)
        return True

    def emit(self, seq: Sequence, token_ids: list[int], reason: str | None,
              stop_reason: int | None = None, logprobs=None) -> None:  # fmt: skip
        """Queue one SeqOutput, after its request's DetokParams (sent once)."""
        request = seq.request
        if not request.started:
            self._started.append(detok_params(request))
        self._outputs.append(
            SeqOutput(
                request.request_id,
                seq.index,
                token_ids,
                reason,
                stop_reason,
                logprobs,
                request.gpu_seconds,
            )  # fmt: skip
        )

    def retire(self, seq: Sequence, unlink: bool = True) -> None:
        """Mark finished, unlink from its queue, free its blocks (after the step in flight),
        tell the runner, and hand pending forks to an heir if it never forked them."""
        if unlink:
            if seq.status is WAITING:
                self.waiting.remove(seq)
            elif seq.status is RUNNING:
                self.running.remove(seq)
            elif seq.status is FORK_PENDING:
                seq.fork_parent.forks.remove(seq)
        seq.status = FINISHED
        if self.spec is not None:
            self.spec.forget(seq.seq_id)
        if seq.forks:
            heir, *rest = seq.forks
            heir.forks, heir.fork_parent, heir.status = rest, None, WAITING
            for child in rest:
                child.fork_parent = heir
            seq.forks = []
            self.waiting.appendleft(heir)
        if not seq.in_flight:
            self.blocks.free(seq.seq_id)
        if seq.on_runner:
            self.finished_ids.append(seq.seq_id)
            seq.on_runner = False
        del self._seqs[seq.seq_id]
        request = seq.request
        request.num_live -= 1
        if request.num_live == 0:
            del self._requests[request.request_id]
            if request.sampling.grammar is not None:
                self._grammar_done.append(request.request_id)
