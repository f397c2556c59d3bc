"""Fixtures of the API tests: the default model's tokenizer, a fake engine, the Quart app."""

from __future__ import annotations

import json

import pytest

from api.server import ServerConfig, create_app
from tests.api.fake_engine import FakeEngine


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's real tokenizer (cached on disk by model_source after one load)."""
    from model_runner.config import EngineConfig
    from model_runner.model_source import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(EngineConfig()))


@pytest.fixture
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def app(engine):
    return create_app(engine, ServerConfig(max_logprobs=5))


@pytest.fixture
def client(app):
    return app.test_client()


def sse_events(raw: bytes) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
