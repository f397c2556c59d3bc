"""Transports and the actor loop: delivery, strict decoding, survival of bad messages."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from actors.actor import Actor
from actors.protocol import Abort, ResetPrefixCache, StepTokens
from actors.transport import InProcessTransport, ZmqTransport, make_run_dir


class RecordingScheduler(Actor):
    """Stands in for the scheduler: records what reaches its inbox; fails on one message."""

    name = "scheduler"

    def __init__(self, transport) -> None:
        super().__init__(transport)
        self.seen: list[msgspec.Struct] = []

    async def handle(self, msg):
        if isinstance(msg, ResetPrefixCache):
            raise RuntimeError("handler bug")
        self.seen.append(msg)


async def exercise(transport) -> RecordingScheduler:
    actor = RecordingScheduler(transport)
    task = asyncio.create_task(actor.run())
    out = transport.outbox("scheduler")
    out.send(Abort(request_id="a"))
    out.send(StepTokens())  # not in the scheduler's union: rejected, counted
    out.send_bytes(b"\x93garbage")
    out.send(ResetPrefixCache())  # the handler raises: logged, counted, the actor lives
    out.send(Abort(request_id="b", index=2))
    for _ in range(200):
        if len(actor.seen) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    return actor


@pytest.mark.parametrize("kind", ["inproc", "zmq", "zmq-colocated"])
async def test_delivery_and_survival(kind, tmp_path):
    if kind.startswith("zmq"):
        run_dir = make_run_dir(str(tmp_path))
        assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
        transport = ZmqTransport(run_dir, colocated=("scheduler",) if "colocated" in kind else ())
    else:
        transport = InProcessTransport()
    actor = await exercise(transport)
    assert actor.seen == [Abort(request_id="a"), Abort(request_id="b", index=2)]
    assert actor.inbox.rejected == 2
    assert actor.handler_errors == 1
    transport.close()


def test_zmq_uses_ipc_only(tmp_path):
    transport = ZmqTransport(tmp_path)
    assert transport.address("scheduler") == f"ipc://{tmp_path}/scheduler.sock"


async def test_colocated_peers_skip_zeromq_and_remote_ones_still_arrive(tmp_path):
    run_dir = make_run_dir(str(tmp_path))
    engine = ZmqTransport(run_dir, colocated=("scheduler", "executor"))
    remote = ZmqTransport(run_dir)
    actor = RecordingScheduler(engine)
    task = asyncio.create_task(actor.run())
    local = engine.outbox("scheduler")
    assert not hasattr(local, "socket")  # a queue of encoded bytes, not a ZeroMQ socket
    local.send(Abort(request_id="local"))
    remote.outbox("scheduler").send(Abort(request_id="remote"))
    for _ in range(200):
        if len(actor.seen) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert sorted(m.request_id for m in actor.seen) == ["local", "remote"]
    engine.close()
    remote.close()
