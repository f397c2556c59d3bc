"""The supervisor starts actor processes, hears their heartbeats and reports a dead one."""

from __future__ import annotations

import asyncio
import time

from actors.supervisor import Supervisor
from actors.transport import ZmqTransport, make_run_dir
from model_runner.config import EngineConfig


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_dead_actor_process_is_reported(tmp_path):
    transport = ZmqTransport(make_run_dir(str(tmp_path)))
    supervisor = Supervisor(EngineConfig(), transport, placement={"tok": ["tokenizer"]})
    supervisor.start()
    watcher = asyncio.create_task(supervisor.watch())
    try:
        assert await wait_for(lambda: "tokenizer" in supervisor.last_beat, 120)
        assert supervisor.problems() == []
        supervisor.processes["tok"].kill()
        assert await wait_for(lambda: supervisor.problems() != [], 10)
        assert "process tok (tokenizer) exited" in supervisor.problems()[0]
    finally:
        watcher.cancel()
        supervisor.shutdown()
        transport.close()
    assert not transport.run_dir.exists()
