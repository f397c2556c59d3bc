"""The supervisor: starts actor processes, watches their heartbeats, reports the dead."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from actors.protocol import Heartbeat
from actors.transport import ZmqTransport
from actors.wiring import DEFAULT_PLACEMENT

log = logging.getLogger(__name__)

# NOTE: actors beat every second from their event loop, and CPU-heavy work (model steps,
# loading, grammar compiles, tokenization) runs in threads, so 4 missed beats mean a hung loop.
HEARTBEAT_TIMEOUT_S = 4.0
STARTUP_GRACE_S = 600.0  # imports + model load on a busy 2-core machine, before the first beat


class Supervisor:
    """Owns the actor processes of one server instance and their run directory."""

    def __init__(
        self, config, transport: ZmqTransport, placement: dict[str, list[str]] | None = None
    ) -> None:
        self.config = config
        self.transport = transport
        self.placement = placement or DEFAULT_PLACEMENT
        self.processes: dict[str, subprocess.Popen] = {}
        self.last_beat: dict[str, float] = {}
        self.beats: dict[str, Heartbeat] = {}  # each actor's latest
        self.inbox = transport.inbox("supervisor")
        self.started_at = 0.0

    def start(self) -> None:
        config_json = msgspec.json.encode(self.config).decode()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # NOTE: workers log at this process's level (`--log-level`): debug shows tracebacks.
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for process, actors in self.placement.items():
            cmd = [sys.executable, "-m", "actors.worker", "--process", process,
                   "--actors", ",".join(actors), "--run-dir", str(self.transport.run_dir),
                   "--config", config_json, "--log-level", log_level]  # fmt: skip
            self.processes[process] = subprocess.Popen(cmd, env=env)
        self.started_at = time.monotonic()

    async def watch(self) -> None:
        """Record heartbeats until cancelled."""
        while True:
            msg = await self.inbox.recv()
            if isinstance(msg, Heartbeat):
                self.last_beat[msg.actor] = time.monotonic()
                self.beats[msg.actor] = msg

    def problems(self) -> list[str]:
        """What is wrong right now; empty when every actor is alive and beating."""
        found = []
        now = time.monotonic()
        for process, actors in self.placement.items():
            code = self.processes[process].poll()
            if code is not None:
                found.append(f"process {process} ({', '.join(actors)}) exited with code {code}")
                continue
            for actor in actors:
                last = self.last_beat.get(actor)
                if last is None:
                    if now - self.started_at > STARTUP_GRACE_S:
                        found.append(f"actor {actor} never sent a heartbeat")
                elif now - last > HEARTBEAT_TIMEOUT_S:
                    found.append(f"actor {actor} sent no heartbeat for {now - last:.0f} s")
        return found

    def shutdown(self, timeout: float = 5.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(Path(self.transport.run_dir), ignore_errors=True)
