"""The internal bus is not reachable from outside, and garbage on it is harmless.

- ZeroMQ lives only on ipc:// sockets in a private (0700) run directory: the server's whole
  process tree listens on one TCP socket, the HTTP port, and on no UDP socket.
- Every actor's inbox survives garbage (random bytes, a truncated frame, an unknown tag,
  wrong field types, a pickle payload, multipart and empty frames, a frame above the size
  cap): each malformed frame is dropped and counted in
  `tokenmill:bus_rejected_messages_total{actor}`, the actor lives on, nothing is unpickled,
  and the server still answers with nothing lost.
"""

from __future__ import annotations

import os
import pickle
import stat
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from actors.protocol import Abort
from actors.transport import MAX_MESSAGE_BYTES
from tests.conftest import ServerProcess
from tests.ops.invariants import assert_nothing_lost, by_actor
from tests.ops.metrics_scrape import scrape
from tests.ops.test_drain import children_of

# A right tag with a wrong field type, per inbox.
WRONG_TYPES = {
    "api": {"msg": "RequestError", "request_id": 5, "status": "x", "message": 1},
    "tokenizer": {"msg": "GenerateRequest", "request_id": 5, "sampling": [], "arrival_time": "x"},
    "scheduler": {"msg": "Abort", "request_id": 5},
    "executor": {"msg": "ReleaseGrammars", "request_ids": "not a list"},
    "detokenizer": {"msg": "StepTokens", "started": 5, "outputs": 5},
    "supervisor": {"msg": "Heartbeat", "actor": 5, "pid": "x", "time": "x"},
}


class _Pwn:
    """Unpickling this would create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def bus_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    with ServerProcess("--max-model-len", "1024", "--kv-cache-memory", "0.25",
                       "--enforce-eager", env={"TMPDIR": str(root)}) as srv:  # fmt: skip
        (run_dir,) = root.glob("tokenmill-*")
        yield srv, run_dir


def process_tree(pid: int) -> list[int]:
    return [pid] + [p for child in children_of(pid) for p in process_tree(child)]


def socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def inet_sockets(inodes: set[str]) -> list[tuple[str, int, str]]:
    """(protocol, local port, state) of the TCP/UDP sockets among `inodes`."""
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{proto}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((proto, int(fields[1].rsplit(":", 1)[1], 16), fields[3]))
    return found


def test_only_the_http_port_listens(bus_server):
    srv, run_dir = bus_server
    pids = process_tree(srv.proc.pid)
    assert len(pids) >= 4  # the API process and its three worker processes
    sockets = inet_sockets(socket_inodes(pids))
    listening = [(proto, port) for proto, port, state in sockets if state == "0A"]
    assert listening == [("tcp", srv.port)], sockets
    assert not [s for s in sockets if s[0].startswith("udp")], sockets
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    names = {p.name for p in run_dir.iterdir()}
    assert {f"{a}.sock" for a in WRONG_TYPES} <= names


def rejected(base_url: str) -> dict[str, float]:
    return by_actor(scrape(base_url), "bus_rejected_messages_total")


def test_every_inbox_survives_garbage(bus_server, tmp_path):
    srv, run_dir = bus_server
    before = rejected(srv.base_url)
    pwned = tmp_path / "pwned"
    ctx = zmq.Context()
    frames_per_inbox = 0
    try:
        for actor, wrong in WRONG_TYPES.items():
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(f"ipc://{run_dir / actor}.sock")
            garbage = [
                os.urandom(64),
                msgspec.msgpack.encode(Abort(request_id="x" * 40))[:-7],  # truncated
                msgspec.msgpack.encode({"msg": "NoSuchMessage", "request_id": "x"}),
                msgspec.msgpack.encode(wrong),
                pickle.dumps(_Pwn(pwned)),
                b"",
            ]
            for frame in garbage:
                sock.send(frame)
            sock.send_multipart([b"\xc1", b"\xff\xfe\xfd"])  # two frames, both malformed
            frames_per_inbox = len(garbage) + 2
            sock.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))  # ZeroMQ drops it and the connection
            sock.close()
    finally:
        ctx.term()
    deadline = time.monotonic() + 15  # NOTE: worker actors report in their next heartbeat
    while time.monotonic() < deadline:
        after = rejected(srv.base_url)
        counts = {a: after.get(a, 0) - before.get(a, 0) for a in WRONG_TYPES}
        if all(n >= frames_per_inbox for n in counts.values()):
            break
        time.sleep(0.5)
    assert counts == dict.fromkeys(WRONG_TYPES, frames_per_inbox)
    assert srv.proc.poll() is None
    assert not pwned.exists()
    assert_nothing_lost(srv.base_url)
