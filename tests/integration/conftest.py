"""The tool-calling server: auto tool choice with the hermes parser, float32 (exact greedy)."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess


@pytest.fixture(scope="session")
def tool_server():
    """One server for the tool-calling and structured-output tests.

    NOTE: --dtype float32 pins greedy outputs across runs and batches (the CPU default
    may become bfloat16).
    """
    srv = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", "0.25",
                        "--dtype", "float32", "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes")  # fmt: skip
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()
