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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serving import percentile  # noqa: E402
from prompts import shared_prefix, word_text  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402

SERVE_FLAGS = ("--max-model-len", "2048", "--kv-cache-memory", "0.5")
ACTORS = ("api", "tokenizer", "scheduler", "executor", "detokenizer")
FAILED = ("lost", "stuck", "http_5xx", "unexpected")  # outcomes that fail the run
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}},
    "required": ["name"],
    "additionalProperties": False,
}
STOPS = [" the", "\n"]
HTTP_STATES = ("01", "08")  # ESTABLISHED, CLOSE_WAIT


# ---------------------------------------------------------------- requests and their answers


@dataclass
class Spec:
    """One request to send, and what its answer must look like."""

    kind: str
    path: str
    body: dict | bytes
    stream: bool = False
    n: int = 1
    hang_up: float = 0.0  # > 0: close the connection after this many chunks (or seconds, plain)
    bad: bool = False  # a bad request: a 4xx in OpenAI's error shape is the answer
    check: Callable[[list[Choice]], str | None] | None = None


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    tools: list[list[str]] = field(default_factory=list)  # [name, arguments]


@dataclass
class Result:
    kind: str
    outcome: str  # ok, hung_up, rejected, or one of FAILED
    start_s: float  # since the run began
    e2e_s: float
    ttft_s: float | None = None
    detail: str = ""


def error_shape_problem(body: bytes) -> str | None:
    """None for `{"error": {"message": str, "type": str, "param", "code"}}`."""
    try:
        err = json.loads(body)["error"]
        keys_ok = all(k in err for k in ("message", "type", "param", "code"))
        if keys_ok and isinstance(err["message"], str) and isinstance(err["type"], str):
            return None
    except (ValueError, KeyError, TypeError):
        pass
    return f"not OpenAI's error shape: {body[:120]!r}"


def judge_status(spec: Spec, status: int, body: bytes) -> tuple[str, str] | None:
    """The outcome an HTTP status decides on its own; None for a 200 to read on."""
    if status >= 500:
        return "http_5xx", f"HTTP {status}: {body[:160]!r}"
    if spec.bad:
        if 400 <= status < 500:
            problem = error_shape_problem(body)
            return ("unexpected", problem) if problem else ("rejected", f"HTTP {status}")
        return "unexpected", f"HTTP {status} for a bad request"
    if status != 200:
        return "unexpected", f"HTTP {status}: {body[:160]!r}"
    return None


def judge_answer(spec: Spec, choices: list[Choice]) -> tuple[str, str]:
    """Complete means every choice has a finish_reason; then the kind's own check."""
    reasons = [c.finish_reason for c in choices]
    if len(choices) != spec.n or None in reasons:
        return "lost", f"{len(choices)}/{spec.n} choices, finish reasons {reasons}"
    if any(r not in ("stop", "length", "tool_calls") for r in reasons):
        return "unexpected", f"finish reasons {reasons}"
    problem = spec.check(choices) if spec.check else None
    return ("unexpected", problem) if problem else ("ok", "")


def plain_choices(answer: dict) -> list[Choice]:
    out = []
    for c in sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0)):
        msg = c.get("message") or {}
        calls = [[t["function"]["name"], t["function"]["arguments"]]
                 for t in msg.get("tool_calls") or []]  # fmt: skip
        text = c.get("text") or msg.get("content") or ""
        out.append(Choice(text, c.get("finish_reason"), calls))
    return out


def fold_chunk(choices: dict[int, Choice], chunk: dict) -> bool:
    """Add one streamed chunk to `choices`; True when it carried output."""
    output = False
    for c in chunk.get("choices") or []:
        choice = choices.setdefault(c.get("index", 0), Choice())
        delta = c.get("delta") or {}
        text = c.get("text") or delta.get("content") or ""
        choice.text += text
        for call in delta.get("tool_calls") or []:
            while len(choice.tools) <= call.get("index", 0):
                choice.tools.append(["", ""])
            fn = call.get("function") or {}
            choice.tools[call.get("index", 0)][0] += fn.get("name") or ""
            choice.tools[call.get("index", 0)][1] += fn.get("arguments") or ""
        choice.finish_reason = c.get("finish_reason") or choice.finish_reason
        output = output or bool(text or delta.get("tool_calls"))
    return output


def content(body: dict | bytes) -> dict:
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    return {"json": body}


async def call_plain(client: httpx.AsyncClient, spec: Spec, start: float):
    request = client.post(spec.path, **content(spec.body))
    try:
        resp = await asyncio.wait_for(request, spec.hang_up) if spec.hang_up else await request
    except asyncio.TimeoutError:
        return "hung_up", None, f"closed after {spec.hang_up:.1f} s"
    decided = judge_status(spec, resp.status_code, resp.content)
    if decided:
        return *decided, None
    return *judge_answer(spec, plain_choices(resp.json())), None


async def call_stream(client: httpx.AsyncClient, spec: Spec, start: float):
    choices: dict[int, Choice] = {}
    ttft, chunks, done = None, 0, False
    async with client.stream("POST", spec.path, **content(spec.body)) as resp:
        if resp.status_code != 200 or spec.bad:
            return *judge_status(spec, resp.status_code, await resp.aread()), None
        async for line in resp.aiter_lines():  # NOTE: to the end, so the connection is reused
            if done or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                return "unexpected", f"error event: {json.dumps(chunk)[:160]}", ttft
            if fold_chunk(choices, chunk):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                chunks += 1
                if spec.hang_up and chunks >= spec.hang_up:
                    return "hung_up", ttft, f"closed after {chunks} chunks"  # closes the socket
    if not done:
        return "lost", ttft, "the stream ended without [DONE]"
    return *judge_answer(spec, [choices[i] for i in sorted(choices)]), ttft


async def send(client: httpx.AsyncClient, spec: Spec, timeout: float, t0: float) -> Result:
    """Send `spec`; its outcome (a request without a full answer in `timeout` s is stuck)."""
    start = time.perf_counter()
    call = call_stream if spec.stream else call_plain
    try:
        outcome, detail, ttft = await asyncio.wait_for(call(client, spec, start), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        outcome, detail, ttft = "stuck", f"no full answer in {timeout:.0f} s", None
    except httpx.HTTPError as exc:
        outcome, detail, ttft = "lost", f"{type(exc).__name__}: {exc}", None
    except (ValueError, KeyError, TypeError) as exc:  # malformed JSON or answer
        outcome, detail, ttft = "unexpected", f"{type(exc).__name__}: {exc}", None
    return Result(spec.kind, outcome, start - t0, time.perf_counter() - start, ttft, detail)


# ---------------------------------------------------------------- the mix


def no_stop_string(choices: list[Choice]) -> str | None:
    hits = [s for c in choices for s in STOPS if s in c.text]
    return f"stop string {hits[0]!r} in the output" if hits else None


def json_named(choices: list[Choice]) -> str | None:
    """A finished answer parses and fits NAME_SCHEMA (a cut one may not)."""
    for c in choices:
        if c.finish_reason != "stop":
            continue
        try:
            value = json.loads(c.text)
        except ValueError:
            return f"not JSON: {c.text[:80]!r}"
        if not isinstance(value, dict) or set(value) != {"name"} or len(value["name"]) > 16:
            return f"off the schema: {c.text[:80]!r}"
    return None


def forced_tool(choices: list[Choice]) -> str | None:
    """tool_choice required: a finished answer is calls of get_weather with a city."""
    for c in choices:
        if c.finish_reason == "length":
            continue
        if c.finish_reason != "tool_calls" or not c.tools:
            return f"finish_reason {c.finish_reason} without a tool call"
        for name, arguments in c.tools:
            try:
                args = json.loads(arguments)
            except ValueError:
                return f"tool arguments not JSON: {arguments[:80]!r}"
            if name != "get_weather" or not isinstance(args.get("city"), str):
                return f"bad call {name}({arguments[:80]})"
    return None


class Mix:
    """Request bodies of every kind, drawn with one seeded generator per client task."""

    def __init__(self, model: str, prefix_len: int, max_tokens: int, seed: int) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.system = shared_prefix(prefix_len, seed)
        self.rng = random.Random(seed)

    def gen(self, **extra) -> dict:
        r = self.rng
        temperature = r.choice([0.0, 0.8])
        sampling = {
            "temperature": temperature,
            **({"seed": r.randrange(1 << 30)} if temperature else {}),
        }
        return {
            "model": self.model,
            "max_tokens": r.randint(8, self.max_tokens),
            **sampling,
            **extra,
        }

    def user(self) -> str:
        words = word_text(self.rng.randint(8, 40), self.rng)
        return f"{self.rng.randrange(10**6)} Continue: {words}"

    def chat(self, stream: bool, system: str | None = None, **extra) -> dict:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.user()})
        return self.gen(messages=messages, **self.streaming(stream), **extra)

    def text(self, stream: bool, **extra) -> dict:
        return self.gen(prompt=self.user(), **self.streaming(stream), **extra)

    def streaming(self, stream: bool) -> dict:
        usage = self.rng.random() < 0.5
        return {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})
                } if stream else {}  # fmt: skip

    def coin(self) -> bool:
        return self.rng.random() < 0.5

    # ------------------------------------------------------------ one method per kind

    def chat_plain(self) -> Spec:
        return Spec("chat_plain", CHAT, self.chat(False))

    def chat_stream(self) -> Spec:
        return Spec("chat_stream", CHAT, self.chat(True), stream=True)

    def text_plain(self) -> Spec:
        return Spec("text_plain", TEXT, self.text(False))

    def text_stream(self) -> Spec:
        return Spec("text_stream", TEXT, self.text(True), stream=True)

    def n2(self) -> Spec:
        stream = self.coin()
        body = self.chat(stream, n=2) if self.coin() else self.text(stream, n=2)
        return Spec("n2", CHAT if "messages" in body else TEXT, body, stream=stream, n=2)

    def shared_prefix(self) -> Spec:
        stream = self.coin()
        return Spec("shared_prefix", CHAT, self.chat(stream, self.system), stream=stream)

    def json_schema(self) -> Spec:
        stream = self.coin()
        fmt = {"type": "json_schema", "json_schema": {"name": "named", "schema": NAME_SCHEMA}}
        body = self.chat(stream, response_format=fmt)
        body["messages"][-1]["content"] = "Name a " + body["messages"][-1]["content"]
        return Spec("json_schema", CHAT, body, stream=stream, check=json_named)

    def tool_required(self) -> Spec:
        stream = self.coin()
        body = self.chat(stream, tools=[WEATHER], tool_choice="required")
        body["messages"][-1]["content"] = f"Weather in city {self.rng.randrange(100)}?"
        return Spec("tool_required", CHAT, body, stream=stream, check=forced_tool)

    def stop(self) -> Spec:
        stream = self.coin()
        body = self.text(stream, stop=STOPS) if self.coin() else self.chat(stream, stop=STOPS)
        path = CHAT if "messages" in body else TEXT
        return Spec("stop", path, body, stream=stream, check=no_stop_string)

    def hang_up(self) -> Spec:
        """A client that goes away: after 1-3 chunks, or 0.2-1.5 s into a plain request."""
        if self.coin():
            body = self.chat(True, max_tokens=self.max_tokens)
            return Spec("hang_up", CHAT, body, stream=True, hang_up=self.rng.randint(1, 3))
        return Spec("hang_up", TEXT, self.text(False, max_tokens=self.max_tokens),
                    hang_up=self.rng.uniform(0.2, 1.5))  # fmt: skip

    def bad(self) -> Spec:
        m, msgs = self.model, [{"role": "user", "content": "Hello"}]
        bodies: list[tuple[str, dict | bytes]] = [
            (TEXT, {"model": "no-such-model", "prompt": "Hi", "max_tokens": 8}),
            (TEXT, {"model": m, "prompt": "Hi", "temperature": -1, "max_tokens": 8}),
            (TEXT, {"model": m, "prompt": "Hi", "max_tokens": 100_000}),
            (TEXT, {"model": m, "prompt": word_text(2100, self.rng), "max_tokens": 8}),
            (CHAT, {"model": m, "messages": [], "max_tokens": 8}),
            (CHAT, {"model": m, "messages": msgs, "tool_choice": "required", "max_tokens": 8}),
            (CHAT, {"model": m, "messages": msgs, "n": 0}),
            (CHAT, b'{"model": "x", "messages": [{"role": '),
        ]
        path, body = self.rng.choice(bodies)
        stream = self.coin() and isinstance(body, dict)
        body = {**body, "stream": True} if stream else body
        return Spec("bad", path, body, stream=stream, bad=True)

    def make(self, kind: str) -> Spec:
        return getattr(self, kind)()


# NOTE: kind -> weight; each kind is a Mix method of the same name.
KINDS = {"chat_plain": 2, "chat_stream": 3, "text_plain": 2, "text_stream": 2, "n2": 1,
         "shared_prefix": 2, "json_schema": 1, "tool_required": 1, "stop": 1, "hang_up": 1,
         "bad": 1}  # fmt: skip


class Deck:
    """The kinds in shuffled rounds, shared by all client tasks: the first round holds each
    kind once (so even a short run sees them all), the next ones `weight` cards of each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cards = list(KINDS)
        self.rng.shuffle(self.cards)
        self.dealt = 0

    @property
    def every_kind_dealt(self) -> bool:
        return self.dealt >= len(KINDS)

    def draw(self) -> str:
        self.dealt += 1
        if not self.cards:
            self.cards = [k for k, weight in KINDS.items() for _ in range(weight)]
            self.rng.shuffle(self.cards)
        return self.cards.pop()


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


# ---------------------------------------------------------------- the run


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


# ---------------------------------------------------------------- the report


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def judge_process(name: str, samples: list[dict], args) -> tuple[dict, list[str]]:
    """Slopes after the warm-up (a short run: its last 3 samples at least)."""
    fit = [s for s in samples if s["t_s"] >= args.warmup]
    fit = fit if len(fit) >= 3 else samples[-3:]
    rss = slope_per_min([(s["t_s"], s["rss_mib"]) for s in fit])
    fds = slope_per_min([(s["t_s"], s["fds_less_http"]) for s in fit])
    pids = sorted({s["pid"] for s in samples})
    problems = [f"{name}: restarted (pids {pids})"] if len(pids) > 1 else []
    if rss is not None and rss > args.max_rss_slope:
        problems.append(f"{name}: RSS grows {rss:.2f} MiB/min")
    if fds is not None and fds > args.max_fd_slope:
        problems.append(f"{name}: fds grow {fds:.2f}/min")
    first, last = samples[0], samples[-1]
    summary = {"pids": pids, "num_samples": len(samples), "fit_from_s": fit[0]["t_s"],
               "rss_mib_first": first["rss_mib"], "rss_mib_last": last["rss_mib"],
               "rss_slope_mib_per_min": rss, "fds_first": first["fds"], "fds_last": last["fds"],
               "fd_slope_per_min": fds, "samples": samples}  # fmt: skip
    return summary, problems


def latency_windows(results: list[Result], window: float) -> list[dict]:
    """p99 E2E and TTFT (streamed) of the answered generations, per window of start time."""
    groups: dict[int, list[Result]] = defaultdict(list)
    for r in results:
        if r.outcome == "ok" and r.kind != "bad":
            groups[int(r.start_s // window)].append(r)
    out = []
    for i, rs in sorted(groups.items()):
        e2e = [r.e2e_s * 1000 for r in rs]
        ttft = [r.ttft_s * 1000 for r in rs if r.ttft_s is not None]
        out.append({"start_s": i * window, "end_s": (i + 1) * window, "requests": len(rs),
                    "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99),
                    "ttft_p99_ms": percentile(ttft, 99) if ttft else None})  # fmt: skip
    return out


def build_report(args, run: Run, base_url: str) -> dict:
    by_kind = {k: dict(Counter(r.outcome for r in run.results if r.kind == k)) for k in KINDS}
    outcomes = Counter(r.outcome for r in run.results)
    failures = [f"{outcomes[o]} {o}" for o in FAILED if outcomes[o]]
    failures += [f"idle check at {c['t_s']} s: {c['leaks'] or c['canary_detail'] or c['canary']}"
                 for c in run.checks if not c["ok"]]  # fmt: skip
    processes = {}
    for name, samples in sorted(run.samples.items()):
        processes[name], problems = judge_process(name, samples, args)
        failures += problems
    if not run.drain.get("ok", True):
        failures.append(f"{run.drain['close_wait_left']} connections left in CLOSE_WAIT")
    examples = [asdict(r) for r in run.results if r.outcome in FAILED][:20]
    return {
        "config": vars(args),
        "base_url": base_url,
        "thresholds": {
            "rss_slope_mib_per_min": args.max_rss_slope,
            "fd_slope_per_min": args.max_fd_slope,
        },  # fmt: skip
        "requests": {
            "total": len(run.results),
            "by_outcome": dict(outcomes),
            "by_kind": by_kind,
            "failed_examples": examples,
        },  # fmt: skip
        "lost": outcomes["lost"],
        "stuck": outcomes["stuck"],
        "http_5xx": outcomes["http_5xx"],
        "unexpected": outcomes["unexpected"],
        "latency_windows": latency_windows(run.results, args.window),
        "invariant_checks": run.checks,
        "connection_drain": run.drain,
        "processes": processes,
        "failures": failures,
        "passed": not failures,
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(rep: dict) -> None:
    req = rep["requests"]
    print(f"{req['total']} requests: {rep['lost']} lost, {rep['stuck']} stuck, "
          f"{rep['http_5xx']} 5xx, {rep['unexpected']} unexpected")  # fmt: skip
    for kind, counts in req["by_kind"].items():
        print(f"  {kind:<14} " + ", ".join(f"{o} {n}" for o, n in sorted(counts.items())))
    for w in rep["latency_windows"]:
        print(f"  {w['start_s']:>5.0f}-{w['end_s']:<5.0f} s: {w['requests']:>4} answered, "
              f"E2E p50 {fmt(w['e2e_p50_ms'], '.0f')} p99 {fmt(w['e2e_p99_ms'], '.0f')} ms, "
              f"TTFT p99 {fmt(w['ttft_p99_ms'], '.0f')} ms")  # fmt: skip
    head = f"{'process':<12} {'samples':>7} {'RSS MiB':>17} {'MiB/min':>8} {'fds':>9} {'fd/min':>7}"
    print("  " + head)
    for name, p in rep["processes"].items():
        print(f"  {name:<12} {p['num_samples']:>7} "
              f"{p['rss_mib_first']:>8.1f}>{p['rss_mib_last']:<8.1f} "
              f"{fmt(p['rss_slope_mib_per_min']):>8} {p['fds_first']:>4}>{p['fds_last']:<4} "
              f"{fmt(p['fd_slope_per_min']):>7}")  # fmt: skip
    checks = rep["invariant_checks"]
    settled = ", ".join(f"{c['settle_s']:.1f}" for c in checks)
    passed = sum(c["ok"] for c in checks)
    print(f"  idle checks: {passed}/{len(checks)} passed (settled in {settled} s)")
    drain = rep["connection_drain"]
    if drain:
        print(f"  connections left in CLOSE_WAIT {drain['waited_s']:.0f} s after the end: "
              f"{drain['close_wait_left']}")  # fmt: skip
    print("PASSED" if rep["passed"] else "FAILED: " + "; ".join(rep["failures"]))


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
