"""Headless Chromium for the web console's tests: Debian's `chromium` package (`.ci/run`
installs it), driven by Playwright's Python package pointed at it (never `playwright
install`, which downloads a browser), and an app served on a real socket from a thread.

Loaded as a plugin by tests/conftest.py: the `browser` and `console_page` fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(
    os.environ.get("TOKENMILL_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


# NOTE: per module, not per session: while Playwright's sync API runs, its event loop is the
# thread's running loop, and pytest-asyncio cannot run the async tests of other modules.
@pytest.fixture(scope="module")
def browser():
    path = chromium_executable()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    # NOTE: Chromium's sandbox refuses to start as root
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=args)
        yield chromium
        chromium.close()


@dataclass
class ConsolePage:
    """A Playwright page with every console error and uncaught exception it raised."""

    page: object
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        """Save a full-page PNG as a test artifact (under test-artifacts/console/)."""
        path = ARTIFACTS / "console" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def console_page(browser) -> Iterator[ConsolePage]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    watched = ConsolePage(page)
    page.on("console", lambda msg: msg.type == "error" and watched.errors.append(msg.text))
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))
    try:
        yield watched
    finally:
        context.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_on_socket(app, config) -> Iterator[str]:
    """Serve a Quart app (e.g. on a fake engine) with hypercorn in a thread; its base URL."""
    from api.lifecycle import serve_app

    started = threading.Event()
    state: dict = {}

    async def serve() -> None:
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await serve_app(app, config, state["stop"])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the server thread did not start"
    url = f"http://{config.host}:{config.port}"
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url + "/health", timeout=1)
            break
        assert time.monotonic() < deadline, "the app did not listen within 10 s"
        time.sleep(0.05)
    try:
        yield url
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(15)


def wait_until(predicate, timeout: float = 30.0, what: str = "the condition"):
    """Poll `predicate` (Python reading the page) until it is truthy; its value.

    NOTE: not `page.wait_for_function`, whose polling evaluates a string in the page: the
    console's CSP (no 'unsafe-eval') refuses it, as it should.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.05)
    return value


def models_loaded(page) -> None:
    page.locator("#model option").first.wait_for(state="attached")
