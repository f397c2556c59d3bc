"""Graceful shutdown on SIGTERM/SIGINT (systemd stop, Kubernetes pod deletion, Ctrl-C), and
the exit when the engine dies.

A dead or hung engine process (exited, or 4 s without a heartbeat) is not restarted in place:
its open requests are failed (an error event then `[DONE]`, or a 5xx), `/health` answers 503
for `ENGINE_DEATH_GRACE_S`, and the server exits with code 1 for systemd (`Restart=
on-failure`) or Kubernetes to start a fresh one. NOTE: a restart in place would have to
rebuild the scheduler's and the API's view of every request and KV block; a fresh process
starts from one known state, and the service manager already restarts with backoff.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("tokenmill")

ENGINE_POLL_S = 0.5
ENGINE_DEATH_GRACE_S = 2.0  # failed requests flush their error events; /health shows 503


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
        self.exit_code = 0

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

    async def exit_when_engine_dies(self) -> None:
        """Stop serving, exit code 1, once an engine process died or hung."""
        while not self.engine.problems():
            await asyncio.sleep(ENGINE_POLL_S)
        log.error("engine failed: %s; exiting for the service manager to restart the server",
                  "; ".join(self.engine.problems()))  # fmt: skip
        self.exit_code = 1
        self.engine.draining = True
        await asyncio.sleep(ENGINE_DEATH_GRACE_S)
        self.stop.set()
