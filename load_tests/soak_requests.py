"""The soak's requests: what one looks like (Spec), sending it, and judging its answer
(OpenAI's error shape for a bad one, a finish_reason for every choice, [DONE] for a stream)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

FAILED = ("lost", "stuck", "http_5xx", "unexpected")  # outcomes that fail the run
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


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
