"""Locust load test: users streaming chat completions from a tokenmill (or any OpenAI) server.

    pip install 'tokenmill[test]'      # locust
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 16 -r 4 --run-time 2m

Besides the request itself (its time is the whole stream), each request reports a
"TTFT" entry: the time to the first streamed content. Bounded: `TOKENMILL_MAX_TOKENS`
(default 64) tokens per request, `TOKENMILL_TIMEOUT` seconds (default 120) per request.
Set `TOKENMILL_MODEL` (default: the first of /v1/models) and `TOKENMILL_API_KEY` if needed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import WORDS  # noqa: E402

MAX_TOKENS = int(os.environ.get("TOKENMILL_MAX_TOKENS", "64"))
TIMEOUT = float(os.environ.get("TOKENMILL_TIMEOUT", "120"))
QUESTIONS = [
    "Write a short poem about {}.",
    "Explain what a {} is to a child.",
    "Give three facts about the {}.",
    "Tell a two-sentence story about a {} and a {}.",
]


class ChatUser(HttpUser):
    """One chat client: asks a short question, reads the SSE stream to the end, waits."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        key = os.environ.get("TOKENMILL_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = os.environ.get("TOKENMILL_MODEL") or self.first_model()

    def first_model(self) -> str:
        resp = self.client.get("/v1/models", name="/v1/models", timeout=TIMEOUT)
        return resp.json()["data"][0]["id"]

    @task
    def stream_chat(self) -> None:
        question = random.choice(QUESTIONS).format(*random.sample(WORDS, 2))
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            stream=True,
            catch_response=True,
            timeout=TIMEOUT,
            name="/v1/chat/completions (stream)",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                first = self.read_stream(resp)
            except (OSError, ValueError) as exc:  # connection dropped, malformed chunk
                resp.failure(f"stream broken: {exc!r}")
                return
            # NOTE: locust stops the clock at the headers; count the whole stream instead.
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if first is None:
                resp.failure("stream ended without content or [DONE]")
                return
            ttft_ms = (first - start) * 1000
            events.request.fire(
                request_type="SSE",
                name="TTFT",
                response_time=ttft_ms,
                response_length=0,
                exception=None,
                context={},
            )
            resp.success()

    @staticmethod
    def read_stream(resp) -> float | None:
        """Reads SSE lines to `[DONE]`; returns when the first content arrived (or None)."""
        first = None
        for raw in resp.iter_lines():
            line = raw.decode() if isinstance(raw, bytes) else raw
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return first
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            if first is None and any((c.get("delta") or {}).get("content") for c in choices):
                first = time.perf_counter()
        return None
