"""Structured outputs against a real server: valid outputs, the error table, mixed batches."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest_asyncio

from tests.api.structured_cases import CASES
from tests.integration.test_disconnects import metric
from tests.integration.tool_cases import PERSON, STRUCTURED_CASES
from tests.ops.metrics_scrape import settled, total

MODEL = "SmolLM2-135M-Instruct"
PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are"]


@pytest_asyncio.fixture(loop_scope="function")  # NOTE: the test's own loop
async def api(tool_server):
    async with openai.AsyncOpenAI(
        base_url=tool_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=900
    ) as client:
        yield client


def request_fields(kind: str, spec) -> dict:
    """The same constraint through each of the request fields clients use."""
    match kind:
        case "json_schema":
            fmt = {"name": "answer", "schema": spec, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": fmt}}
        case "json_object":
            return {"response_format": {"type": "json_object"}}
        case "regex":
            return {"extra_body": {"structured_outputs": {"regex": spec}}}
        case "choice":
            return {"extra_body": {"guided_choice": spec}}
    raise AssertionError(kind)


def assert_valid(kind: str, spec, text: str) -> None:
    match kind:
        case "json_schema":
            jsonschema.validate(json.loads(text), spec)
        case "json_object":
            assert isinstance(json.loads(text), dict)
        case "regex":
            assert re.fullmatch(spec, text), text
        case "choice":
            assert text in spec


async def test_every_output_follows_its_constraint(api):
    answers = await asyncio.gather(*(
        api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=120,
            temperature=0, **request_fields(kind, spec))
        for kind, spec, prompt in STRUCTURED_CASES
    ))  # fmt: skip
    for (kind, spec, prompt), answer in zip(STRUCTURED_CASES, answers, strict=True):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        assert_valid(kind, spec, choice.message.content)


async def test_completions_and_sampling_options_compose_with_the_grammar(api):
    digits = r"\d{3}-\d{4}"
    sampled, min_tokens, penalized, stopped = await asyncio.gather(
        api.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=100, n=3,
                               temperature=1.0, seed=7, logprobs=2,
                               extra_body={"guided_json": PERSON}),
        api.completions.create(model=MODEL, prompt="Pick one:", max_tokens=20, temperature=0,
                               extra_body={"guided_choice": ["a", "b"], "min_tokens": 8}),
        api.completions.create(model=MODEL, prompt="Phone:", max_tokens=20, temperature=0,
                               frequency_penalty=1.5, presence_penalty=1.0,
                               extra_body={"guided_regex": digits}),
        api.completions.create(model=MODEL, prompt="Phone:", max_tokens=20, temperature=0,
                               stop=["-"], extra_body={"guided_regex": digits}),
    )  # fmt: skip
    assert len(sampled.choices) == 3
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.text), PERSON)
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) > 0
    assert min_tokens.choices[0].text in ("a", "b")  # the complete grammar ends it early
    assert min_tokens.choices[0].finish_reason == "stop"
    assert re.fullmatch(digits, penalized.choices[0].text)
    assert re.fullmatch(r"\d{3}", stopped.choices[0].text) and stopped.choices[0].stop_reason == "-"


async def test_plain_greedy_outputs_are_unchanged_by_grammar_requests_in_the_batch(api):

    async def plain(prompt: str) -> str:
        answer = await api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0
        )
        return answer.choices[0].text

    alone = [await plain(p) for p in PLAIN_PROMPTS]
    grammar_requests = [
        api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=60,
            temperature=0, **request_fields(kind, spec))
        for kind, spec, prompt in STRUCTURED_CASES[:4]
    ]  # fmt: skip
    results = await asyncio.gather(*grammar_requests, *(plain(p) for p in PLAIN_PROMPTS))
    assert results[len(grammar_requests) :] == alone


async def test_a_repeated_schema_is_compiled_once(api, tool_server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    fields = request_fields("json_schema", schema)

    async def scrape() -> str:
        async with httpx.AsyncClient(base_url=tool_server.base_url) as http:
            return (await http.get("/metrics")).text

    async def ask() -> None:
        messages = [{"role": "user", "content": "A digit?"}]
        await api.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, **fields
        )

    await ask()
    before = await scrape()
    await ask()
    after = await scrape()
    assert (
        metric(after, "grammar_cache_hits_total") == metric(before, "grammar_cache_hits_total") + 1
    )
    assert metric(after, "grammar_compiles_total") == metric(before, "grammar_compiles_total")
    assert metric(after, "grammar_compile_seconds_total") > 0


async def test_bad_specifications_are_400s_and_the_server_stays_healthy(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
        for name, path, body, status, param, fragment in CASES:
            resp = await http.post(path, json={"model": MODEL, **body})
            assert resp.status_code == status, (name, resp.text)
            error = resp.json()["error"]
            assert error["param"] == param and fragment in error["message"], name
        assert (await http.get("/health")).status_code == 200
        ok = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        # NOTE: the engine's gauges reach the API apart from the answer; wait for them.
        samples = await asyncio.to_thread(settled, server.base_url)
        assert total(samples, "num_requests_running") == 0
        assert total(samples, "kv_cache_usage_perc") == 0
