"""Servers of the integration tests: tool calling (hermes, float32), and a small one to fuzz."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess


@pytest.fixture(scope="package")  # NOTE: stopped after tests/integration
def tool_server():
    """One server for the tool-calling and structured-output tests.

    NOTE: --dtype float32 pins greedy outputs across runs and batches (the CPU default
    may become bfloat16).
    """
    with ServerProcess("--max-model-len", "2048", "--kv-cache-memory", "0.25",
                       "--dtype", "float32", "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes") as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="package")  # NOTE: stopped after tests/integration
def small_server():
    """One short-context server for the fuzzing tests (test_fuzz_api, test_sampling_fuzz).

    NOTE: --max-model-len 256 bounds every generation the fuzzers cannot bound themselves.
    """
    with ServerProcess("--max-model-len", "256", "--kv-cache-memory", "0.25",
                       "--dtype", "float32", "--enforce-eager") as srv:  # fmt: skip
        yield srv
