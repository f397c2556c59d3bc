"""A dead (kill -9) or hung (SIGSTOP) actor process: its in-flight streams get an error event
in OpenAI's shape then [DONE] within seconds, /health turns 503, and the server exits with
code 1 for the service manager to restart it, reaping its children and its run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.ops.test_drain import Stream, children_of, healthy, wait_until


def process_of(children: list[int], group: str) -> int:
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f"--process\0{group}\0".encode() in f.read():
                return pid
    raise AssertionError(f"no {group} process among {children}")


@pytest.mark.parametrize(
    ("group", "fault"), [("detokenizer", signal.SIGKILL), ("engine", signal.SIGSTOP)]
)
def test_a_dead_or_hung_actor_fails_its_requests_and_the_server_exits(tmp_path, group, fault):
    run_root = tmp_path / "tmp"
    run_root.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "api", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "2048", "--kv-cache-memory", "0.25", "--enforce-eager"]  # fmt: skip
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TMPDIR=str(run_root)))  # fmt: skip
    victim = None
    try:
        wait_until(lambda: healthy(base, proc), 300, "server did not start")
        children = children_of(proc.pid)
        run_dirs = list(run_root.glob("tokenmill-*"))
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        stream = Stream(base, model, 1900)
        stream.start()
        assert stream.first_token.wait(120)
        victim = process_of(children, group)
        os.kill(victim, fault)
        faulted = time.monotonic()
        stream.join(30)
        failed_after = time.monotonic() - faulted
        saw_503 = _health_503_before_exit(base, proc)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if victim is not None and fault == signal.SIGSTOP and os.path.exists(f"/proc/{victim}"):
            os.kill(victim, signal.SIGKILL)

    assert not stream.is_alive() and stream.events[-1] == "[DONE]"
    error = json.loads(stream.events[-2])["error"]
    assert error["type"] == "ServiceUnavailableError" and "engine failure" in error["message"]
    assert failed_after < 8, failed_after  # heartbeats: 4 s; a dead process: at once
    assert saw_503
    assert code == 1
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children), "child left running"
    assert not any(d.exists() for d in run_dirs), "run directory left behind"


def _health_503_before_exit(base: str, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 503:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False
