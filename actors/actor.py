"""The actor base: one asyncio task loop draining one inbox."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import msgspec

from actors.protocol import Heartbeat
from actors.transport import Transport

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


class Actor(ABC):
    """An independent unit of state that talks only through messages.

    `__init__` only wires sockets and state; `run()` does async set-up (`start`), then
    handles one message at a time. A handler that raises is logged and counted; the actor
    lives on (a bad message must never take the server down).
    """

    name: ClassVar[str]

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.inbox = transport.inbox(self.name)
        self.handler_errors = 0

    async def start(self) -> None:  # noqa: B027 (an optional hook)
        """Async set-up before the first message (load a model, say)."""

    def open_requests(self) -> int:
        """Requests this actor holds state for; 0 when idle (nothing may leak)."""
        return 0

    @abstractmethod
    async def handle(self, msg: msgspec.Struct) -> None:
        """React to one message; dispatch with `match` on its type."""

    async def run(self) -> None:
        await self.start()
        while True:
            msg = await self.inbox.recv()
            try:
                await self.handle(msg)
            except Exception:
                self.handler_errors += 1
                log.exception("%s failed to handle %s", self.name, type(msg).__name__)


async def send_heartbeats(transport: Transport, actors: list[Actor]) -> None:
    """Tell the supervisor, every second, that these actors' event loop is alive."""
    supervisor = transport.outbox("supervisor")
    parent = os.getppid()
    while True:
        for actor in actors:
            supervisor.send(
                Heartbeat(
                    actor=actor.name,
                    pid=os.getpid(),
                    time=time.time(),
                    open_requests=actor.open_requests(),
                    rejected_messages=actor.inbox.rejected,
                )
            )
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)
        if os.getppid() != parent:  # the supervisor's process is gone: so are we
            log.error("supervisor process exited; stopping %s", [a.name for a in actors])
            os._exit(1)
