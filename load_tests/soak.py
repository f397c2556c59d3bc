"""Soak: mixed traffic against one server for a long run; memory, fds, latency, nothing lost.

    python load_tests/soak.py --duration 1800 --out soak.json            # starts its own server
    python load_tests/soak.py --base-url http://127.0.0.1:8000 --out soak.json

Without `--base-url` it serves the default model on a free port with `--max-model-len 2048
--kv-cache-memory 0.5` (`--tokenmill-flag` adds a serve flag; `--server-log FILE` keeps its
output). With `--base-url` the server must run on this machine: its processes are found by
the URL's listening port (or `--pid`).

`--concurrency` client tasks send a random mix (see KINDS): streamed and plain chat and text
completions, n=2, a shared long system prompt with varied questions, `response_format`
json_schema, a forced tool call, stop strings, clients that hang up mid-answer, and bad
requests (a 4xx in OpenAI's error shape is their right answer); the first 11 requests are
one of each kind, and the traffic lasts until they were all sent. Every `--sample-interval`
it reads VmRSS and the open fds of the API process and all its descendants; every
`--idle-every` it pauses the traffic, waits for /metrics to show nothing running, waiting,
held in the KV cache or open in any actor, and sends a canary (once more at the end).

The run fails (exit 1) on any lost request (no finish_reason or no [DONE]), stuck request
(no answer within `--timeout`), 5xx, unexpected answer, failed idle check, restarted
process, or a process whose least-squares slope after `--warmup` exceeds
`--max-rss-slope` MiB/min (default 1) or `--max-fd-slope` fds/min (default 0.1, i.e. flat:
fewer than 3 fds over 30 minutes). The fd slope leaves out the API process's HTTP
connections (ESTABLISHED or CLOSE_WAIT on the port), whose number follows the clients and
hypercorn's 75 s keep-alive; instead, once the client has closed its connections, a drain
check waits up to `--drain-wait` s for none of them to be left in CLOSE_WAIT. The report
goes to stdout and `--out`.

This file is the CLI and the run; its siblings: soak_requests.py (sending a request and
judging its answer), soak_traffic.py (the kinds, KINDS and their checks), soak_server.py
(/proc samples, idle and drain checks), soak_report.py (slopes, p99 windows, the report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from servers import running, tokenmill_cmd  # noqa: E402
from soak_report import build_report, print_report  # noqa: E402
from soak_requests import Result, send  # noqa: E402
from soak_server import drain_check, idle_check, listener_pid, sample  # noqa: E402
from soak_traffic import Deck, Mix  # noqa: E402

SERVE_FLAGS = ("--max-model-len", "2048", "--kv-cache-memory", "0.5")


class Run:
    """The traffic's state: a gate the idle checks close, and what came back."""

    def __init__(self, t0: float, end: float, seed: int) -> None:
        self.t0, self.end = t0, end
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.results: list[Result] = []
        self.samples: dict[str, list[dict]] = defaultdict(list)
        self.checks: list[dict] = []
        self.deck = Deck(seed)
        self.drain: dict = {}

    async def pause(self) -> None:
        self.gate.clear()
        while self.in_flight:
            await asyncio.sleep(0.05)

    def add_sample(self, root: int, port: int) -> None:
        for name, s in sample(root, port, time.monotonic() - self.t0).items():
            self.samples[name].append(s)


async def client_task(run: Run, client: httpx.AsyncClient, mix: Mix, timeout: float) -> None:
    while True:
        await run.gate.wait()
        if time.monotonic() >= run.end and run.deck.every_kind_dealt:
            return  # NOTE: a slow machine's short run still sends every kind once
        spec = mix.make(run.deck.draw())
        run.in_flight += 1
        try:
            run.results.append(await send(client, spec, timeout, run.t0))
        finally:
            run.in_flight -= 1


async def sampler(run: Run, root: int, port: int, interval: float) -> None:
    while True:
        run.add_sample(root, port)
        await asyncio.sleep(interval)


async def idle_points(run: Run, client: httpx.AsyncClient, mix: Mix, args) -> None:
    """Every `--idle-every` s (none closer than 10 s to the end): pause, check, resume."""
    at = run.t0 + args.idle_every
    while at < run.end - 10:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await run.pause()
        run.checks.append(await idle_check(client, mix, args, run.t0))
        run.gate.set()
        at += args.idle_every


async def soak(args, base_url: str, root: int, port: int) -> Run:
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    timeout = httpx.Timeout(args.timeout + 30, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout,
                                 trust_env=False) as client:  # fmt: skip
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        mixes = [Mix(model, args.prefix_len, args.max_tokens, args.seed + i)
                 for i in range(args.concurrency)]  # fmt: skip
        t0 = time.monotonic()
        run = Run(t0, t0 + args.duration, args.seed)
        sampling = asyncio.create_task(sampler(run, root, port, args.sample_interval))
        tasks = [client_task(run, client, m, args.timeout) for m in mixes]
        await asyncio.gather(idle_points(run, client, mixes[0], args), *tasks)
        run.checks.append(await idle_check(client, mixes[0], args, t0))  # the final one
        sampling.cancel()
        run.add_sample(root, port)
    run.drain = await drain_check(root, port, args.drain_wait)  # the client is closed now
    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="default: start a server")
    p.add_argument("--pid", type=int, default=None, help="the API process (default: by port)")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=300.0, help="seconds left out of the slopes")
    p.add_argument("--sample-interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--window", type=float, default=300.0, help="seconds per p99 window")
    p.add_argument("--idle-every", type=float, default=300.0, help="seconds between idle checks")
    p.add_argument("--idle-timeout", type=float, default=15.0, help="seconds to settle when idle")
    p.add_argument("--concurrency", type=int, default=6, help="client tasks")
    p.add_argument("--timeout", type=float, default=120.0, help="stuck after this many seconds")
    p.add_argument("--max-tokens", type=int, default=48, help="drawn from 8 to this")
    p.add_argument("--prefix-len", type=int, default=512, help="shared system prompt tokens")
    p.add_argument("--max-rss-slope", type=float, default=1.0, help="MiB/min per process")
    p.add_argument("--max-fd-slope", type=float, default=0.1, help="fds/min per process")
    p.add_argument("--drain-wait", type=float, default=90.0,
                   help="seconds for closed connections to go at the end (0: skip)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenmill-flag", action="append", default=[])
    p.add_argument("--server-log", default=None, help="the started server's output")
    p.add_argument("--out", default=None, help="the JSON report")
    return p


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.base_url:
        base_url = args.base_url.rstrip("/")
        port = urlsplit(base_url).port or 80
        run = asyncio.run(soak(args, base_url, args.pid or listener_pid(port), port))
    else:
        port = free_port()
        cmd = tokenmill_cmd(port, *SERVE_FLAGS, *args.tokenmill_flag)
        with running(cmd, port, "tokenmill", log=args.server_log) as base_url:
            run = asyncio.run(soak(args, base_url, args.pid or listener_pid(port), port))
    rep = build_report(args, run, base_url)
    print_report(rep)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=2))
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
