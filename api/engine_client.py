"""The API's handle on the engine: starts the actors, routes requests and their deltas."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

from actors.protocol import (
    Abort,
    Drain,
    EngineFailed,
    EngineReady,
    GenerateRequest,
    LoadLoraAdapter,
    LoraAdapterUpdated,
    PrefixCacheReset,
    RequestError,
    ResetPrefixCache,
    SchedulerStats,
    TextDelta,
    TextDeltas,
    UnloadLoraAdapter,
)
from actors.supervisor import Supervisor
from actors.transport import InProcessTransport, Transport, ZmqTransport, make_run_dir
from actors.wiring import (
    DEFAULT_PLACEMENT,
    build_actor,
    placement_for,
    prepare_engine_process,
    tokenizer_loader,
)
from api.errors import EngineRequestError
from model_runner.config import EngineConfigError
from model_runner.sampling_params import SamplingParams

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5


class ActorState(NamedTuple):
    open_requests: int
    rejected_messages: int


class EngineClient:
    """Owns the actor system of one server (processes, or tasks when `in_process`).

    `generate` yields TextDeltas for one request; leaving the iterator before every sample
    finished (client gone, error, cancellation) aborts the request in the scheduler.
    """

    def __init__(self, config, in_process: bool = False) -> None:
        self.config = config
        self.in_process = in_process
        self.transport: Transport | None = None
        self.supervisor: Supervisor | None = None
        self.actor_tasks: list[asyncio.Task] = []
        self.local_actors: list = []  # in_process: the actor objects
        self.inbox = None
        self.tasks: list[asyncio.Task] = []
        self.streams: dict[str, asyncio.Queue] = {}
        self.unstarted: set[str] = set()  # sent, no delta yet: waiting, in prefill or in transit
        self.stats: SchedulerStats | None = None
        self.info: EngineReady | None = None
        self.ready = asyncio.Event()
        self.start_failure: str | None = None  # why the engine cannot start (EngineFailed)
        self.reset_waiters: list[asyncio.Future] = []
        self.lora_adapters: dict[str, str] = dict(config.lora_modules)  # servable: name -> path
        self.lora_waiters: dict[str, asyncio.Future] = {}  # load/unload id -> its answer
        self.to_scheduler = None
        self.tokenizer = None
        self.model_name = ""
        self.draining = False
        self.stats_listeners: list = []  # called with every SchedulerStats

    # --- life cycle ---------------------------------------------------------------------

    async def start(self, timeout: float = 900.0) -> None:
        from model_runner.model_source import resolve_model

        source = resolve_model(self.config)
        self.model_name = self.config.served_model_name or source.name
        self.tokenizer = await asyncio.to_thread(tokenizer_loader(self.config))
        if self.in_process:
            prepare_engine_process(self.config)
            self.transport = InProcessTransport()
            actors = [build_actor(n, self.transport, self.config) for n in _all_actors()]
            self.actor_tasks = [asyncio.create_task(a.run(), name=a.name) for a in actors]
            self.local_actors = actors
        else:
            self.transport = ZmqTransport(make_run_dir())
            self.supervisor = Supervisor(self.config, self.transport, placement_for(self.config))
            self.supervisor.start()
            self.tasks.append(asyncio.create_task(self.supervisor.watch()))
        self.inbox = self.transport.inbox("api")
        self.to_tokenizer = self.transport.outbox("tokenizer")
        self.to_scheduler = self.transport.outbox("scheduler")
        self.tasks.append(asyncio.create_task(self._dispatch()))
        self.tasks.append(asyncio.create_task(self._watch_health()))
        await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        """Until EngineReady; raises EngineConfigError when the engine reports settings it
        cannot serve (a user error), RuntimeError when a process died, TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.ready.is_set():
            if self.start_failure is not None:
                await self.shutdown()
                raise EngineConfigError(self.start_failure)
            problems = self.problems()
            if problems:
                await self.shutdown()
                raise RuntimeError("engine failed to start: " + "; ".join(problems))
            if time.monotonic() > deadline:
                await self.shutdown()
                raise TimeoutError(f"engine not ready after {timeout:.0f} s")
            try:
                await asyncio.wait_for(self.ready.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def shutdown(self) -> None:
        for task in self.tasks + self.actor_tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, *self.actor_tasks, return_exceptions=True)
        self.tasks, self.actor_tasks = [], []
        if self.supervisor is not None:
            await asyncio.to_thread(self.supervisor.shutdown)
            self.supervisor = None
        if self.transport is not None:
            self.transport.close()

    # --- health -------------------------------------------------------------------------

    def problems(self) -> list[str]:
        if self.supervisor is not None:
            return self.supervisor.problems()
        return [
            f"actor {t.get_name()} stopped: {t.exception()!r}"
            for t in self.actor_tasks
            if t.done() and not t.cancelled()
        ]

    def health(self) -> tuple[bool, str]:
        problems = self.problems()
        if problems:
            return False, "; ".join(problems)
        if self.draining:
            return False, "shutting down"
        if not self.ready.is_set():
            return False, "starting"
        return True, "ok"

    async def _watch_health(self) -> None:
        """Fail every open request when an actor dies, instead of leaving it hanging."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            problems = self.problems()
            if problems and self.streams:
                error = RequestError(
                    request_id="", status=503, message="engine failure: " + "; ".join(problems),
                    type="ServiceUnavailableError", code="engine_dead",
                )  # fmt: skip
                for queue in self.streams.values():
                    queue.put_nowait(error)

    def actor_states(self) -> dict[str, ActorState]:
        """Per actor: requests it still tracks and bus messages it rejected (the engine
        actors' as of their last heartbeat). After every request ended, all open counts
        are 0: the "nothing lost" invariant."""
        rejected = self.inbox.rejected if self.inbox is not None else 0
        states = {"api": ActorState(len(self.streams), rejected)}
        if self.supervisor is not None:
            sup = self.supervisor
            states["supervisor"] = ActorState(0, sup.inbox.rejected)
            for name, beat in sorted(sup.beats.items()):
                states[name] = ActorState(beat.open_requests, beat.rejected_messages)
        for actor in self.local_actors:
            states[actor.name] = ActorState(actor.open_requests(), actor.inbox.rejected)
        return states

    # --- traffic ------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    async def _dispatch(self) -> None:
        while True:
            msg = await self.inbox.recv()
            match msg:
                case TextDeltas(deltas=deltas):
                    for delta in deltas:
                        if (queue := self.streams.get(delta.request_id)) is not None:
                            queue.put_nowait(delta)
                case RequestError(request_id=rid):
                    if (queue := self.streams.get(rid)) is not None:
                        queue.put_nowait(msg)
                case SchedulerStats():
                    self.stats = msg
                    for listener in self.stats_listeners:
                        listener(msg)
                case EngineReady():
                    self.info = msg
                    self.ready.set()
                case EngineFailed(message=message):
                    self.start_failure = message
                case LoraAdapterUpdated(request_id=rid):
                    if (fut := self.lora_waiters.pop(rid, None)) is not None and not fut.done():
                        fut.set_result(msg)
                case PrefixCacheReset(ok=ok):
                    waiters, self.reset_waiters = self.reset_waiters, []
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(ok)

    async def generate(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
        feature: str = "none",
        literal_spans: list[tuple[int, int]] | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[TextDelta]:
        if request_id in self.streams:
            raise ValueError(f"duplicate request id {request_id}")
        self._refuse_when_overloaded()
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        self.unstarted.add(request_id)
        self.to_tokenizer.send(
            GenerateRequest(
                request_id=request_id,
                prompt=prompt,
                prompt_token_ids=prompt_token_ids,
                add_special_tokens=add_special_tokens,
                sampling=sampling,
                cache_salt=cache_salt,
                arrival_time=time.time(),
                feature=feature,
                literal_spans=literal_spans or None,
                lora_name=lora_name,
            )
        )
        unfinished = sampling.n
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, RequestError):
                    raise EngineRequestError(
                        status=item.status, message=item.message, type=item.type,
                        param=item.param, code=item.code, retry_after=item.retry_after,
                    )  # fmt: skip
                self.unstarted.discard(request_id)
                if item.finish_reason is not None:
                    unfinished -= 1
                yield item
        finally:
            del self.streams[request_id]
            self.unstarted.discard(request_id)
            if unfinished:
                self.to_scheduler.send(Abort(request_id=request_id))

    def _refuse_when_overloaded(self) -> None:
        """The queue bound, answered here at once when the engine is certainly full: more
        requests without a first token than the waiting queue and the batch hold together.
        NOTE: the scheduler applies the exact bound (`--max-waiting`) on arrival."""
        bound = self.config.max_waiting + self.config.max_num_seqs
        if len(self.unstarted) >= bound:
            raise EngineRequestError(
                status=503, type="ServiceUnavailableError", code="server_overloaded",
                message=f"The server is overloaded: {len(self.unstarted)} requests wait for "
                f"their first token (max_waiting {self.config.max_waiting}). Please retry later.",
                retry_after=1.0,
            )  # fmt: skip

    async def abort(self, request_id: str) -> None:
        self.to_scheduler.send(Abort(request_id=request_id))

    # --- shutdown -----------------------------------------------------------------------

    def drain(self) -> None:
        """Stop taking requests: /health 503, new requests 503, waiting ones aborted."""
        self.draining = True
        if self.to_scheduler is not None:
            self.to_scheduler.send(Drain())

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is open (True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while self.streams:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def abort_all(self) -> None:
        """End every open request with finish_reason "abort"."""
        for request_id in list(self.streams):
            self.to_scheduler.send(Abort(request_id=request_id))

    async def load_lora_adapter(self, name: str, path: str) -> tuple[int, str]:
        """(status, message): 200 once the engine has read and checked the adapter."""
        return await self._update_lora(LoadLoraAdapter, name, lora_path=path)

    async def unload_lora_adapter(self, name: str) -> tuple[int, str]:
        """(status, message): new requests for it get a 404 from then on."""
        return await self._update_lora(UnloadLoraAdapter, name)

    async def _update_lora(self, message_type, name: str, **fields) -> tuple[int, str]:
        request_id = f"lora-{uuid.uuid4().hex}"
        fut = asyncio.get_running_loop().create_future()
        self.lora_waiters[request_id] = fut
        self.to_scheduler.send(message_type(request_id=request_id, lora_name=name, **fields))
        try:
            answer = await asyncio.wait_for(fut, 60.0)
        finally:
            self.lora_waiters.pop(request_id, None)
        if answer.status == 200:
            if message_type is LoadLoraAdapter:
                self.lora_adapters[name] = fields["lora_path"]
            else:
                self.lora_adapters.pop(name, None)
        return answer.status, answer.message

    async def reset_prefix_cache(self) -> bool:
        fut = asyncio.get_running_loop().create_future()
        self.reset_waiters.append(fut)
        self.to_scheduler.send(ResetPrefixCache())
        return await asyncio.wait_for(fut, 30.0)


def _all_actors() -> list[str]:
    return [name for names in DEFAULT_PLACEMENT.values() for name in names]
