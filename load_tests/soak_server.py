"""The server under the soak: its processes' RSS and open fds from /proc, and the checks
that it holds nothing when idle (/metrics, a canary) or after the clients have gone."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from soak_requests import TEXT, Spec, send
from soak_traffic import Mix

ACTORS = ("api", "tokenizer", "scheduler", "executor", "detokenizer")
HTTP_STATES = ("01", "08")  # ESTABLISHED, CLOSE_WAIT


# ---------------------------------------------------------------- the server's processes


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass
    return found


def process_name(pid: int, root: int) -> str:
    """api, an actor worker's `--process` name, or `<comm>-<pid>`."""
    if pid == root:
        return "api"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"actors.worker" in argv and b"--process" in argv:
        return argv[argv.index(b"--process") + 1].decode()
    return f"{Path(f'/proc/{pid}/comm').read_text().strip()}-{pid}"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tcp_sockets(pid: int, port: int, states: tuple[str, ...]) -> set[str]:
    """`socket:[inode]` of the TCP sockets in `states` (hex, as /proc writes them) whose
    local port is `port`."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()  # sl local remote st queues timer retrnsmt uid timeout inode
            if f[3] in states and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{f[9]}]")
    return found


def fd_links(pid: int) -> list[str]:
    """What each open fd of `pid` points at (`socket:[inode]`, a path, ...)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return links


def fd_counts(pid: int, port: int) -> tuple[int, int]:
    """Open fds, and how many of them are HTTP connections on `port` (ESTABLISHED, or
    CLOSE_WAIT: closed by the client, which hypercorn notices on an idle keep-alive
    connection only at its keep-alive timeout). Their number follows the clients; the drain
    check at the end tells a leaked one. The connection tables are read before and after
    the fds, so that a connection opened or closed meanwhile is still known as one."""
    before = tcp_sockets(pid, port, HTTP_STATES)
    links = fd_links(pid)
    http = before | tcp_sockets(pid, port, HTTP_STATES)
    return len(links), sum(link in http for link in links)


def sample(root: int, port: int, t_s: float) -> dict[str, dict]:
    """One sample of every process of the server, by name."""
    out = {}
    for pid in descendants(root):
        try:
            fds, http = fd_counts(pid, port)
            out[process_name(pid, root)] = {"t_s": round(t_s, 1), "pid": pid,
                                            "rss_mib": round(rss_mib(pid), 2), "fds": fds,
                                            "http_connections": http,
                                            "fds_less_http": fds - http}  # fmt: skip
        except OSError:
            pass  # exited meanwhile
    return out


def listener_pid(port: int) -> int:
    """The process listening on TCP `port` on this machine."""
    listening = tcp_sockets(os.getpid(), port, ("0A",))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in listening for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    raise SystemExit(f"no process of this user listens on port {port}; pass --pid")


# ---------------------------------------------------------------- /metrics and idle checks


async def leaks(client: httpx.AsyncClient) -> list[str]:
    """What /metrics shows still held; empty when idle (cf. tests/ops/invariants.py)."""
    resp = await client.get("/metrics")
    samples = [s for f in text_string_to_metric_families(resp.text) for s in f.samples]
    found = []
    for metric in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        value = sum(s.value for s in samples if s.name == "tokenmill:" + metric)
        if value:
            found.append(f"{metric} = {value:g}")
    tables = {s.labels.get("actor"): s.value for s in samples
              if s.name == "tokenmill:actor_open_requests"}  # fmt: skip
    found += [f"actor {a}: no heartbeat state" for a in ACTORS if a not in tables]
    found += [f"actor {a} holds {n:g} requests" for a, n in tables.items() if n]
    return found


async def idle_check(client: httpx.AsyncClient, mix: Mix, args, t0: float) -> dict:
    """With no traffic: /metrics settles to nothing held within `--idle-timeout` (engine
    actors report by a heartbeat every second), then a canary is answered."""
    start = time.monotonic()
    while True:
        try:
            found = await leaks(client)
        except (httpx.HTTPError, ValueError) as exc:
            found = [f"/metrics: {type(exc).__name__}: {exc}"]
        if not found or time.monotonic() - start > args.idle_timeout:
            break
        await asyncio.sleep(0.5)
    settle = time.monotonic() - start
    canary_body = {"model": mix.model, "prompt": "The capital of France is", "max_tokens": 4}
    canary = await send(client, Spec("canary", TEXT, canary_body), args.timeout, t0)
    return {"t_s": round(start - t0, 1), "ok": not found and canary.outcome == "ok",
            "settle_s": round(settle, 2), "leaks": found, "canary": canary.outcome,
            "canary_ms": round(canary.e2e_s * 1000, 1), "canary_detail": canary.detail}  # fmt: skip


async def drain_check(root: int, port: int, wait: float) -> dict:
    """Every connection a client closed gets closed by the server within `wait` s (more
    than hypercorn's keep-alive timeout, 75 s): no CLOSE_WAIT socket is left."""
    start = time.monotonic()
    while True:
        left = len(tcp_sockets(root, port, ("08",)).intersection(fd_links(root)))
        if not left or time.monotonic() - start >= wait:
            return {"waited_s": round(time.monotonic() - start, 1), "close_wait_left": left,
                    "ok": not left or wait <= 0}  # fmt: skip
        await asyncio.sleep(1.0)
