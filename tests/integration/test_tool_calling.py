"""Tool calling against a real server with the default model and the real `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio

from tests.integration.tool_cases import NAMED, TOOL_CASES, WEATHER

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def base_url(tool_server) -> str:
    return tool_server.base_url


@pytest_asyncio.fixture(loop_scope="function")  # NOTE: the test's own loop
async def api(base_url):
    async with openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=900
    ) as client:
        yield client


def tool_choice(tools: list[dict], choice: str):
    if choice == NAMED:
        return {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    return choice


async def create(api: openai.AsyncOpenAI, tools, prompt, choice, max_tokens=200, **fields):
    return await api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        tools=tools,
        tool_choice=tool_choice(tools, choice),
        max_tokens=max_tokens,
        temperature=0,
        **fields,
    )


def assert_valid_calls(tools: list[dict], calls) -> None:
    """Every call names an offered tool and its arguments validate against its schema."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in schemas
        arguments = json.loads(call.function.arguments)
        schema = schemas[call.function.name] or {"type": "object", "maxProperties": 0}
        jsonschema.validate(arguments, schema)


async def test_forced_calls_are_valid_calls_to_offered_tools(api):
    # NOTE: one call per answer for most cases (and the flag is checked), several for some.
    single = [i % 4 != 0 for i in range(len(TOOL_CASES))]
    answers = await asyncio.gather(*(
        create(api, *case, parallel_tool_calls=False if one else None)
        for case, one in zip(TOOL_CASES, single, strict=True)
    ))  # fmt: skip
    for (tools, prompt, choice), one, answer in zip(TOOL_CASES, single, answers, strict=True):
        message, finish = answer.choices[0].message, answer.choices[0].finish_reason
        assert_valid_calls(tools, message.tool_calls)
        if choice == NAMED:
            assert finish == "stop"
            assert [c.function.name for c in message.tool_calls] == [tools[0]["function"]["name"]]
        else:
            assert finish == "tool_calls", prompt
        if one:
            assert len(message.tool_calls) == 1, prompt
        assert not message.content


def reassemble(chunks) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """(content, [(id, name, arguments)] by index, finish_reason) of a streamed answer."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # its first delta: id, type, the whole name, ""
                assert delta.id and delta.type == "function"
                assert delta.function.name and delta.function.arguments == ""
                calls[delta.index] = [delta.id, delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index][2] += delta.function.arguments
        finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


async def test_streamed_calls_reassemble_to_the_non_streamed_ones(api):
    """Forced and auto tool choice, each answer streamed and not, all in one batch."""
    picked = [TOOL_CASES[i] for i in (0, 6, 15)]
    cases = picked + [(tools, prompt, "auto") for tools, prompt, _ in picked]
    limits = [200] * len(picked) + [48] * len(picked)  # NOTE: auto answers are mostly prose
    runs = list(zip(cases, limits, strict=True))
    answers = await asyncio.gather(
        *(create(api, *case, max_tokens=n) for case, n in runs),
        *(create(api, *case, max_tokens=n, stream=True) for case, n in runs),
    )
    whole, streams = answers[: len(cases)], answers[len(cases) :]
    for case, answer, stream in zip(cases, whole, streams, strict=True):
        chunks = [chunk async for chunk in stream]
        content, calls, finish = reassemble(chunks)
        message = answer.choices[0].message
        expected = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert [(name, args) for _, name, args in calls] == expected
        assert content == (message.content or "") and "<tool_call>" not in content
        assert finish == answer.choices[0].finish_reason
        if expected:
            assert_valid_calls(case[0], message.tool_calls)
        if case[2] != "auto":
            assert expected, "a forced call is missing"


async def test_a_tool_round_trip_is_served(api, base_url):
    question = {"role": "user", "content": "What's the weather in Paris?"}
    first = await create(api, [WEATHER], question["content"], "required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    turn = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    messages = [question, turn, result]
    second = await api.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=32, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    function = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
    parsed = {**turn, "tool_calls": [{**call.model_dump(), "function": function}]}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        rendered = []
        for assistant in (turn, parsed):  # arguments as OpenAI's JSON string, and as an object
            body = {"model": MODEL, "messages": [question, assistant, result], "tools": [WEATHER]}
            ids = (await http.post("/tokenize", json=body)).json()["tokens"]
            rendered.append((await http.post("/detokenize", json={"tokens": ids})).json()["prompt"])
            resp = await http.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert resp.status_code == 200
    assert rendered[0] == rendered[1]
    assert f'<tool_response id="{call.id}">\n{{"temperature": 21}}\n</tool_response>' in rendered[0]
    assert f'"arguments": {call.function.arguments}' in rendered[0]
