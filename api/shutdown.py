"""Graceful shutdown on SIGTERM/SIGINT (systemd stop, Kubernetes pod deletion, Ctrl-C)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("tokenmill")


class GracefulShutdown:
    """The first SIGTERM/SIGINT drains: /health and new requests 503 at once, waiting
    requests end "abort", running ones get `timeout` seconds to finish, then the rest are
    aborted and the server stops. A second signal aborts everything and stops at once."""

    def __init__(self, engine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.requested = asyncio.Event()  # a first signal came
        self.stop = asyncio.Event()  # hypercorn stops serving
        self.signals = 0

    def on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            self.requested.set()
            return
        log.warning("second signal: aborting every request and stopping now")
        if self.engine.ready.is_set():
            self.engine.abort_all()
        self.stop.set()

    async def drain(self) -> None:
        await self.requested.wait()
        open_requests = len(self.engine.streams)
        log.info("draining: %d open requests get %g s to finish", open_requests, self.timeout)
        self.engine.drain()
        if not await self.engine.wait_idle(self.timeout):
            log.warning("aborting %d requests still open after %g s",
                        len(self.engine.streams), self.timeout)  # fmt: skip
            self.engine.abort_all()
            await self.engine.wait_idle(5.0)
        self.stop.set()
