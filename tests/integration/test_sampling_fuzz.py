"""Random valid sampling-parameter combinations against a real server: every answer well formed.

Chat and text completions, streamed or not: `n` choices, each ending once in `stop` or
`length`, usage that adds up, stop strings absent from the text, logprobs of the asked
width, and a stream that ends with exactly one finish_reason per choice, then `[DONE]`.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.ops.invariants import assert_nothing_lost

MAX_TOKENS = 3
MAX_TOP_LOGPROBS = 5
STOPS = [" ", "e", ".", "\n", "the", "a", "!", "ing"]
FINISH_REASONS = {"stop", "length"}


def _optional(strategy):
    return st.none() | strategy


SAMPLING = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "max_tokens": st.integers(1, MAX_TOKENS),
        "stream": st.booleans(),
    },
    optional={
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.05, 1.0),
        "top_k": st.sampled_from([-1, 0, 1, 5, 50]),
        "min_p": st.floats(0.0, 0.5),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "repetition_penalty": st.floats(0.5, 2.0),
        "seed": _optional(st.integers(0, 2**31 - 1)),
        "stop": st.lists(st.sampled_from(STOPS), min_size=1, max_size=3, unique=True),
    },
)


@st.composite
def requests(draw):
    """(endpoint, body, top_logprobs asked or None)."""
    body = draw(SAMPLING)
    chat = draw(st.booleans())
    top = draw(_optional(st.integers(0, MAX_TOP_LOGPROBS)))
    if chat:
        body["messages"] = [{"role": "user", "content": "Name a color."}]
        if top is not None:
            body |= {"logprobs": True, "top_logprobs": top}
    else:
        body["prompt"] = "My favourite color is"
        if top is not None:
            body["logprobs"] = top
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, top


def sse_payloads(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded (`[DONE]` kept as a string)."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def check_usage(usage: dict, body: dict, finish_reasons: list[str]) -> None:
    n, max_tokens = body["n"], body["max_tokens"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert n <= usage["completion_tokens"] <= n * max_tokens
    if all(reason == "length" for reason in finish_reasons):
        assert usage["completion_tokens"] == n * max_tokens


def check_text(text: str, body: dict) -> None:
    for stop in body.get("stop") or []:
        assert stop not in text, (stop, text)


def check_logprobs(logprobs, chat: bool, top: int | None, max_tokens: int) -> None:
    if top is None:
        assert logprobs is None
        return
    entries = logprobs["content"] if chat else logprobs["top_logprobs"]
    assert 1 <= len(entries) <= max_tokens
    for entry in entries:
        if chat:
            assert len(entry["top_logprobs"]) == top
        else:  # NOTE: a dict by token text; two ids may decode to one text
            assert len(entry or {}) <= top


def check_response(resp: dict, chat: bool, body: dict, top: int | None) -> None:
    assert resp["object"] == ("chat.completion" if chat else "text_completion")
    choices = resp["choices"]
    assert sorted(c["index"] for c in choices) == list(range(body["n"]))
    for c in choices:
        assert c["finish_reason"] in FINISH_REASONS
        check_text(c["message"]["content"] if chat else c["text"], body)
        check_logprobs(c["logprobs"], chat, top, body["max_tokens"])
    check_usage(resp["usage"], body, [c["finish_reason"] for c in choices])


def check_stream(events: list, chat: bool, body: dict, top: int | None) -> None:
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all("error" not in chunk for chunk in chunks), chunks
    finishes: dict[int, list[str]] = {}
    texts: dict[int, str] = {}
    entries: dict[int, int] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            i = c["index"]
            assert i not in finishes or not finishes[i], f"choice {i} continued after finishing"
            texts[i] = texts.get(i, "") + ((c["delta"].get("content") or "") if chat else c["text"])
            if c.get("logprobs") is not None:
                lp = c["logprobs"]
                entries[i] = entries.get(i, 0) + len(lp["content"] if chat else lp["tokens"])
            if c["finish_reason"] is not None:
                finishes.setdefault(i, []).append(c["finish_reason"])
            finishes.setdefault(i, [])
    assert sorted(finishes) == list(range(body["n"]))
    for i, reasons in finishes.items():
        assert len(reasons) == 1 and reasons[0] in FINISH_REASONS, (i, reasons)
        check_text(texts[i], body)
        if top is not None:
            assert 1 <= entries.get(i, 0) <= body["max_tokens"]
    usage_chunks = [chunk for chunk in chunks if chunk.get("usage")]
    if (body.get("stream_options") or {}).get("include_usage"):
        assert usage_chunks and usage_chunks[-1] is chunks[-1] and chunks[-1]["choices"] == []
        check_usage(chunks[-1]["usage"], body, [r[0] for r in finishes.values()])
    else:
        assert not usage_chunks


@pytest.fixture(scope="module")
def http(small_server):
    with httpx.Client(base_url=small_server.base_url, timeout=60) as client:
        yield client


@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sample=requests())
def test_valid_sampling_is_answered_well_formed(http, sample):
    path, body, top = sample
    note(f"{path} {json.dumps(body)}")
    resp = http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    chat = path == "/v1/chat/completions"
    if body["stream"]:
        assert resp.headers["content-type"].startswith("text/event-stream")
        check_stream(sse_payloads(resp.text), chat, body, top)
    else:
        check_response(resp.json(), chat, body, top)


def test_nothing_lost_after_the_sampling_fuzz(small_server):
    assert_nothing_lost(small_server.base_url)
