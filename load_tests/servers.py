"""Starting a server process for a benchmark run and stopping it afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def wait_healthy(base_url: str, server: subprocess.Popen, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"{name} exited with {server.returncode} before it was healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{name} was not healthy within {timeout:.0f} s")


@contextlib.contextmanager
def running(
    cmd: list[str], port: int, name: str, timeout: float = 600.0, log: str | None = None
) -> Iterator[str]:
    """Run `cmd` (a server on 127.0.0.1:`port`) until the block ends; yields its base URL.

    Its output goes to the file `log` when given, else nowhere."""
    base_url = f"http://127.0.0.1:{port}"
    out = open(log, "w") if log else subprocess.DEVNULL
    server = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base_url, server, timeout, name)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if log:
            out.close()


def tokenmill_cmd(port: int, *flags: str) -> list[str]:
    """`tokenmill serve` on `port` from this checkout, with extra flags."""
    return [sys.executable, "-m", "api", "serve", "--port", str(port), *flags]
