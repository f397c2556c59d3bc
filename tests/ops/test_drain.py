"""The waiting-queue bound: 503 + Retry-After at once. SIGTERM while streams run: /health
and new requests 503 at once, running requests finish within --shutdown-timeout, waiting
ones end "abort" with [DONE] (non-streamed: a 503), the rest are aborted at the timeout;
children reaped, run directory removed, exit code 0. Also --enable-log-requests: one JSON
line per finished request, never the prompt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.ops.metrics_scrape import scrape, total

SHUTDOWN_TIMEOUT = 8.0
PROMPT = "Count slowly from one to one thousand."
WARM_TOKENS = 24
SHORT_STREAM_SECONDS = 3.0  # of SHUTDOWN_TIMEOUT: SIGTERM comes about a second after it starts


class Stream(threading.Thread):
    """One streamed chat completion read to its end: its events and first-token time."""

    def __init__(self, base_url: str, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = base_url + "/v1/chat/completions"
        self.body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                     "max_tokens": max_tokens, "ignore_eos": True, "stream": True}  # fmt: skip
        self.events: list[str] = []
        self.status: int | None = None
        self.first_token = threading.Event()
        self.first_token_at = self.done_at = 0.0

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if '"content":"' in line and '"content":""' not in line:
                        if not self.first_token.is_set():
                            self.first_token_at = time.monotonic()
                        self.first_token.set()
        self.done_at = time.monotonic()

    def finish_reasons(self) -> list[str]:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]


def short_stream_tokens(base: str, model: str, seconds: float) -> int:
    """How many tokens one of two concurrent streams yields in about `seconds` on this
    machine (measured now, warm): the short stream must end well inside the drain window,
    yet still be running when SIGTERM comes, on fast and slow CI CPUs alike."""
    warm = [Stream(base, model, WARM_TOKENS) for _ in range(2)]
    for s in warm:
        s.start()
    for s in warm:
        s.join(120)
        assert s.status == 200 and s.finish_reasons() == ["length"]
    itl = max((s.done_at - s.first_token_at) / (WARM_TOKENS - 1) for s in warm)
    return max(8, min(400, int(seconds / itl)))


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sigterm_drains_then_exits_cleanly(tmp_path):
    run_root = tmp_path / "tmp"
    run_root.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "api", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", "2", "--max-waiting", "2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
           "--enable-log-requests", "--max-model-len", "2048", "--kv-cache-memory", "0.25",
           "--enforce-eager"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TMPDIR=str(run_root)))  # fmt: skip
    try:
        wait_until(lambda: healthy(base, proc), 300, "server did not start")
        run_dirs = list(run_root.glob("tokenmill-*"))
        assert run_dirs, "no private run directory"
        children = children_of(proc.pid)
        assert children, "no actor processes"
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]

        short_tokens = short_stream_tokens(base, model, SHORT_STREAM_SECONDS)
        short, long = Stream(base, model, short_tokens), Stream(base, model, 1900)
        for s in (short, long):
            s.start()
        for s in (short, long):
            assert s.first_token.wait(120)
        queued = Stream(base, model, 10)
        queued.start()
        non_streamed: dict = {}
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 10}  # fmt: skip
        post = threading.Thread(target=lambda: non_streamed.update(
            resp=httpx.post(base + "/v1/chat/completions", json=body, timeout=120)))  # fmt: skip
        post.start()
        wait_until(lambda: total(scrape(base), "num_requests_waiting") == 2, 20, "not queued")
        # the waiting queue is full: refused at once (before any running request ends)
        for _ in range(4):
            over = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
            assert over.status_code == 503 and over.headers["Retry-After"] == "1"
            assert over.json()["error"]["code"] == "server_overloaded"
        assert short.is_alive() and long.is_alive()

        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: httpx.get(base + "/health").status_code == 503, 2, "/health stayed 200")
        late = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
        assert late.status_code == 503 and late.headers["Retry-After"]
        assert late.json()["error"]["type"] == "ServiceUnavailableError"

        for thread in (queued, post, short, long):
            thread.join(SHUTDOWN_TIMEOUT + 30)
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert queued.status == 200 and queued.events[-1] == "[DONE]"
    assert queued.finish_reasons() == ["abort"]
    resp = non_streamed["resp"]
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "shutting_down"
    assert short.finish_reasons() == ["length"] and short.events[-1] == "[DONE]"
    assert long.finish_reasons() == ["abort"] and long.events[-1] == "[DONE]"
    assert SHUTDOWN_TIMEOUT - 1 < elapsed < SHUTDOWN_TIMEOUT + 15
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "child left running"
    assert not any(d.exists() for d in run_dirs), "run directory left behind"

    marker = "tokenmill.requests: "
    lines = log_path.read_text().splitlines()
    records = [json.loads(line.split(marker, 1)[1]) for line in lines if marker in line]
    by_reason = sorted(str(r["finish_reason"]) for r in records)
    assert by_reason == ["abort"] * 3 + ["length"] * 3, records  # two of them the warm-up's
    lengths = [r for r in records if r["finish_reason"] == "length"]  # in the order they ended
    assert [r["output_tokens"] for r in lengths] == [WARM_TOKENS, WARM_TOKENS, short_tokens]
    finished = lengths[-1]
    assert finished["input_tokens"] > 0
    assert finished["gpu_seconds"] > 0 and 0 < finished["ttft_s"] <= finished["e2e_s"]
    assert set(finished) == {
        "request_id", "feature", "model", "input_tokens", "output_tokens", "cached_tokens",
        "gpu_seconds", "ttft_s", "e2e_s", "finish_reason",
    }  # fmt: skip
    assert PROMPT not in log_path.read_text()


def healthy(base: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "server exited during start-up"
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
