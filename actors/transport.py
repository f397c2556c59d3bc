"""Transports: how actors' messages travel. ZeroMQ between processes, queues within one.

Every actor owns one inbox, named after it, that decodes exactly its own tagged union
(`actors.protocol.INBOX_TYPES`). Senders hold an outbox per destination. Decoding is strict:
a message of the wrong shape is dropped and counted, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from actors.protocol import inbox_type

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()

# NOTE: above the HTTP body cap (api.server.MAX_BODY_BYTES, 32 MiB), so any request the API
# accepts fits; ZeroMQ drops a bigger frame (and that peer's connection) before it is read.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Inbox(ABC):
    """The receiving end of one actor's mailbox."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.decoder = msgspec.msgpack.Decoder(inbox_type(name))
        self.rejected = 0  # messages that failed strict decoding

    def decode(self, data: bytes) -> msgspec.Struct | None:
        try:
            return self.decoder.decode(data)
        except Exception as e:  # DecodeError, ValidationError; whatever a frame holds
            self.rejected += 1
            if self.rejected & (self.rejected - 1) == 0:  # the 1st, 2nd, 4th, ...: no log flood
                log.warning("%s inbox rejected a message (%d so far): %s",
                            self.name, self.rejected, e)  # fmt: skip
            return None

    async def recv(self) -> msgspec.Struct:
        """The next well-formed message; malformed ones are skipped."""
        while True:
            msg = self.decode(await self.recv_bytes())
            if msg is not None:
                return msg

    @abstractmethod
    async def recv_bytes(self) -> bytes: ...

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release the inbox's resources."""


class Outbox(ABC):
    """The sending end towards one actor; `send` never blocks the event loop."""

    def send(self, msg: msgspec.Struct) -> None:
        self.send_bytes(_encoder.encode(msg))

    @abstractmethod
    def send_bytes(self, data: bytes) -> None: ...


class Transport(ABC):
    @abstractmethod
    def inbox(self, name: str) -> Inbox: ...

    @abstractmethod
    def outbox(self, name: str) -> Outbox: ...

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Close every socket this transport opened."""


# --- asyncio queues (actors in one process) ---------------------------------------------


class _QueueInbox(Inbox):
    def __init__(self, name: str, queue: asyncio.Queue[bytes]) -> None:
        super().__init__(name)
        self.queue = queue

    async def recv_bytes(self) -> bytes:
        return await self.queue.get()


class _QueueOutbox(Outbox):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def send_bytes(self, data: bytes) -> None:
        # NOTE: bytes, not objects, cross the queue, so in-process runs test the same codec.
        self.queue.put_nowait(data)


# --- ZeroMQ -----------------------------------------------------------------------------


def make_run_dir(base: str | None = None) -> Path:
    """A private (0700) directory for the ipc:// sockets of one server instance."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tokenmill-", dir=base))
    os.chmod(path, 0o700)
    return path


class _ZmqInbox(Inbox):
    def __init__(self, name: str, socket: zmq.asyncio.Socket) -> None:
        super().__init__(name)
        self.socket = socket

    async def recv_bytes(self) -> bytes:
        return await self.socket.recv(copy=True)

    def close(self) -> None:
        self.socket.close(linger=0)


class _ZmqOutbox(Outbox):
    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket

    def send_bytes(self, data: bytes) -> None:
        # NOTE: PUSH queues while the peer is not yet connected; SNDHWM 0 = never block.
        self.socket.send(data, copy=False)


class _ColocatedInbox(_QueueInbox):
    """The inbox of an actor whose peers share its process: a queue, also fed from ZeroMQ.

    Senders in the same process put bytes on the queue; the ZeroMQ socket (owned and closed
    by the transport) still takes messages from other processes, forwarded by a task.
    """

    def __init__(self, name: str, queue: asyncio.Queue[bytes], socket: zmq.asyncio.Socket):
        super().__init__(name, queue)
        self.socket = socket
        self._forward: asyncio.Task | None = None

    async def recv_bytes(self) -> bytes:
        if self._forward is None:
            self._forward = asyncio.create_task(self._forward_remote())
        return await super().recv_bytes()

    async def _forward_remote(self) -> None:
        while True:
            self.queue.put_nowait(await self.socket.recv(copy=True))

    def close(self) -> None:
        if self._forward is not None:
            self._forward.cancel()


class ZmqTransport(Transport):
    """PUSH/PULL over `ipc://<run_dir>/<actor>.sock`; never TCP.

    `colocated`: actors running in this process (one event loop). Messages between them
    skip ZeroMQ (an asyncio queue of the same encoded bytes): on a busy 2-core machine each
    ZeroMQ hop between the scheduler and the executor cost ~0.5 ms, a twentieth of a
    decode step.
    """

    def __init__(self, run_dir: str | Path, colocated: tuple[str, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.async_ctx = zmq.asyncio.Context()
        self.sync_ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.local_queues = {name: asyncio.Queue() for name in colocated}
        self.colocated_inboxes: list[_ColocatedInbox] = []

    def address(self, name: str) -> str:
        return f"ipc://{self.run_dir / name}.sock"

    def inbox(self, name: str) -> Inbox:
        sock = self.async_ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.bind(self.address(name))
        self.sockets.append(sock)
        if name in self.local_queues:
            inbox = _ColocatedInbox(name, self.local_queues[name], sock)
            self.colocated_inboxes.append(inbox)
            return inbox
        return _ZmqInbox(name, sock)

    def outbox(self, name: str) -> Outbox:
        if name in self.local_queues:
            return _QueueOutbox(self.local_queues[name])
        sock = self.sync_ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address(name))
        self.sockets.append(sock)
        return _ZmqOutbox(sock)

    def close(self) -> None:
        for inbox in self.colocated_inboxes:
            inbox.close()
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()


# --- in-process -------------------------------------------------------------------------


class InProcessTransport(Transport):
    """Every actor in one event loop (tests, the offline `LLM`): asyncio queues of bytes."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[bytes]] = {}

    def queue_of(self, name: str) -> asyncio.Queue[bytes]:
        """The queue behind `name`'s inbox, made on first use by either end."""
        return self.queues.setdefault(name, asyncio.Queue())

    def inbox(self, name: str) -> Inbox:
        return _QueueInbox(name, self.queue_of(name))

    def outbox(self, name: str) -> Outbox:
        return _QueueOutbox(self.queue_of(name))
