"""Schemathesis fuzzing of every route of a real server, from its own `/openapi.json`.

Positive cases (bodies the request structs accept), negative ones (bodies they refuse), and
"deep" ones: positive bodies without the range-checked sampling fields (tests/api covers
those) and with a minimal prompt, so that random messages, tools, chat-template kwargs and
structured-output specs get past the sampling checks to the chat template, the tool and
grammar checks and the engine. Every response: no 5xx, 4xx in OpenAI's error shape, and
schemathesis' conformance to the document. Derandomized, no shrinking: a bounded run.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import ROUTES
from tests.ops.invariants import assert_nothing_lost

MAX_MODEL_LEN = 256  # the small_server's --max-model-len
MAX_NEW_TOKENS, MAX_N, MAX_PROMPTS = 2, 2, 2  # valid values are scaled down to these
EXAMPLES = {
    "/v1/chat/completions": 100,
    "/v1/completions": 100,
    "/tokenize": 60,
    "/detokenize": 40,
    "/v1/models/{model}": 15,
    "/v1/responses": 40,
}
EXAMPLES_WITHOUT_INPUT = 3  # GET /health and the like: nothing to vary
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Range-checked fields dropped from the "deep" cases.
SAMPLING_FIELDS = frozenset(
    "model n best_of temperature top_p top_k min_p presence_penalty frequency_penalty "
    "repetition_penalty length_penalty seed min_tokens priority prompt_logprobs "
    "truncate_prompt_tokens use_beam_search logprobs top_logprobs max_tokens "
    "max_completion_tokens metadata logit_bias cache_salt suffix echo chat_template "
    "stream_options max_output_tokens".split()
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def bounded(case):
    """Scale valid token counts, `n` and prompt batches down; invalid values stay (400s)."""
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return case
    keys = (
        ("max_output_tokens",)
        if case.path == "/v1/responses"
        else ("max_tokens", "max_completion_tokens")
    )
    for key in keys:
        value = body.get(key)
        if type(value) is int and MAX_NEW_TOKENS < value < MAX_MODEL_LEN:
            body[key] = value % MAX_NEW_TOKENS + 1
    if all(body.get(key) is None for key in keys):
        body[keys[0]] = MAX_NEW_TOKENS  # NOTE: else the rest of the context is generated
    if type(n := body.get("n")) is int and MAX_N < n <= 128:
        body["n"] = n % MAX_N + 1
    prompt = body.get("prompt")
    if isinstance(prompt, list) and not all(type(x) is int for x in prompt):
        body["prompt"] = prompt[:MAX_PROMPTS]
    return case


def deep(case):
    body = case.body
    if not isinstance(body, dict):
        return case
    for key in SAMPLING_FIELDS & body.keys():
        del body[key]
    if case.path == "/v1/chat/completions" and not body.get("messages"):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    if case.path == "/v1/completions" and not body.get("prompt"):
        body["prompt"] = "Hi"
    if case.path == "/v1/responses" and not body.get("input"):
        body["input"] = "Hi"
    if case.path == "/tokenize" and body.get("messages"):
        body.pop("prompt", None)  # exactly one of the two
    return case


def cases(operation):
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    strategies = [positive]
    if operation.body:
        negative = operation.as_strategy(GenerationMode.NEGATIVE)
        strategies += [positive.map(deep), negative]
    return st.one_of(strategies).map(bounded)


def assert_openai_error(response) -> None:
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert isinstance(error["code"], (str, int)), error
    leaks = ("Traceback", '.py"', ".py:", " object at 0x", "site-packages")
    assert not any(leak in error["message"] for leak in leaks), error  # no internals


@pytest.fixture(scope="module")
def fuzz_schema(small_server):
    schema = schemathesis.openapi.from_url(small_server.base_url + "/openapi.json")
    schema.validate()
    return schema


@pytest.mark.parametrize(
    ("method", "path"), [(r.method, r.path) for r in ROUTES], ids=[r.path for r in ROUTES]
)
def test_fuzz_route(fuzz_schema, small_server, method, path):
    operation = fuzz_schema[path][method]
    base_url = small_server.base_url
    statuses = []

    @settings(max_examples=EXAMPLES.get(path, EXAMPLES_WITHOUT_INPUT), **FUZZ_SETTINGS)
    @given(case=cases(operation))
    def fuzz(case):
        note(case.as_curl_command(base_url=base_url))
        response = case.call(base_url=base_url, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert_openai_error(response)
        case.validate_response(response, checks=CHECKS)

    fuzz()
    print(path, sorted(Counter(statuses).items()))  # shown when the test fails
    assert statuses  # the route was exercised
    if path in GENERATION_PATHS:  # some cases got through validation to the engine
        assert 200 in statuses and 400 in statuses, sorted(set(statuses))


def test_server_survives_the_fuzzing(small_server):
    base = small_server.base_url
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert_nothing_lost(base)
    resp = httpx.post(
        base + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    [choice] = resp.json()["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    assert resp.json()["usage"]["completion_tokens"] >= 1
