"""Running the server: hypercorn under uvloop, the engine's start, graceful shutdown on
SIGTERM/SIGINT (systemd stop, Kubernetes pod deletion, Ctrl-C), and the exit when the engine
dies.

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
import signal
import socket

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


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# NOTE: longer than nginx's upstream keepalive_timeout (ops/nginx/tokenmill.conf), so that the
# proxy, not the server, closes an idle kept-alive connection. It also bounds a slowloris
# client: a connection counts as idle until its request's headers are complete.
HYPERCORN_KEEP_ALIVE_S = 75.0
# NOTE: h11 applies its cap only to headers still incomplete after a read (64 KiB), so the
# app checks the parsed headers too (api.server.MAX_HEADER_BYTES, MAX_HEADERS).
MAX_INCOMPLETE_HEADER_BYTES = 16 * 1024


async def serve_app(
    app, server_cfg, stop: asyncio.Event, listener: socket.socket | None = None
) -> None:
    """Serve a Quart app on hypercorn until `stop` is set (open connections then get 5 s).
    `listener`: a bound socket to serve on (hypercorn takes it over), else bind the address."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    hconfig = Config()
    if listener is not None:
        hconfig.bind = [f"fd://{listener.detach()}"]
    else:
        hconfig.bind = [bind_address(server_cfg.host, server_cfg.port)]
    hconfig.accesslog = None
    hconfig.graceful_timeout = 5.0
    hconfig.keep_alive_timeout = HYPERCORN_KEEP_ALIVE_S
    hconfig.h11_max_incomplete_size = MAX_INCOMPLETE_HEADER_BYTES
    hconfig.h2_max_header_list_size = MAX_INCOMPLETE_HEADER_BYTES
    await hypercorn_serve(app, hconfig, shutdown_trigger=stop.wait)


async def serve(engine_cfg, server_cfg, listener: socket.socket | None = None) -> int:
    """Start the engine, serve until SIGTERM/SIGINT, drain, then shut the engine down.
    Returns the exit code: 0 after a signal, 1 when the engine died (see the module docstring).
    `listener`: the server's socket, bound before the model loaded (api.startup_checks)."""
    from api.engine_client import EngineClient
    from api.server import create_app

    engine = EngineClient(engine_cfg)
    shutdown = GracefulShutdown(engine, server_cfg.shutdown_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.on_signal)
    started = False
    try:
        started = await _start_unless_stopped(engine, shutdown.requested)
        if not started:
            return 0
        address = bind_address(server_cfg.host, server_cfg.port)
        log.info("serving %s on http://%s", engine.model_name, address)
        watchers = [asyncio.create_task(shutdown.drain()),
                    asyncio.create_task(shutdown.exit_when_engine_dies())]  # fmt: skip
        await serve_app(create_app(engine, server_cfg), server_cfg, shutdown.stop, listener)
        for task in watchers:
            task.cancel()
        return shutdown.exit_code
    finally:
        if started:  # NOTE: a refused start prints only its reason (api.cli.startup_error)
            log.info("shutting down")
        await engine.shutdown()


async def _start_unless_stopped(engine, stop: asyncio.Event) -> bool:
    """Start the engine; a signal while the model loads cancels the start."""
    start = asyncio.create_task(engine.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        return False
    start.result()
    return True


def run(coro):
    try:
        import uvloop
    except ImportError:  # not on Windows; plain asyncio works too
        return asyncio.run(coro)
    return uvloop.run(coro)
