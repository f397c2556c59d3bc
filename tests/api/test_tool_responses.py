"""Tool-call responses in OpenAI's shapes, streamed and not, from scripted model output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from api.server import ServerConfig, create_app
from api.tools import ToolConfig
from model_runner.sampling_params import GrammarSpec
from tests.api.conftest import sse_events
from tests.api.structured_cases import CHAT, MSG, WEATHER, history, tool

PING = tool("ping")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PING_CALL = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'


@pytest.fixture
def auto_client(engine):
    config = ServerConfig(tool_config=ToolConfig(True, "hermes"))
    return create_app(engine, config).test_client()


async def chat(client, **fields):
    body = {"messages": MSG, "max_tokens": 100, **fields}
    resp = await client.post(CHAT, json=body)
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    return await resp.get_json()


async def chat_stream(client, **fields):
    body = {"messages": MSG, "max_tokens": 100, "stream": True, **fields}
    resp = await client.post(CHAT, json=body)
    assert resp.status_code == 200
    return [e for e in sse_events(await resp.get_data()) if e != "[DONE]"]


def reassemble(events: list[dict], index: int = 0) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) of one choice of a stream, calls grouped by index."""
    content, calls, finish = "", {}, None
    for event in events:
        for choice in event["choices"]:
            if choice["index"] != index:
                continue
            delta = choice["delta"]
            content += delta.get("content") or ""
            for d in delta.get("tool_calls", []):
                call = calls.setdefault(d["index"], {"function": {"arguments": ""}})
                if "id" in d:
                    assert "id" not in call, "a call's head came twice"
                    call.update(id=d["id"], type=d["type"], name=d["function"]["name"])
                    assert d["function"]["arguments"] == ""
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                call["function"]["arguments"] += d["function"].get("arguments", "")
            finish = choice["finish_reason"] or finish
    ordered = [calls[i] for i in sorted(calls)]
    return content, ordered, finish


async def test_auto_calls_with_text_around_them(auto_client, engine):
    engine.set_output("Checking. " + CALL + "\n" + PING_CALL + " Bye")
    body = await chat(auto_client, tools=[WEATHER, PING])
    message, choice = body["choices"][0]["message"], body["choices"][0]
    assert message["content"] == "Checking. Bye"
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == [
        ("function", "get_weather", '{"city": "Paris"}'), ("function", "ping", "{}")]  # fmt: skip
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    assert choice["finish_reason"] == "tool_calls"
    content, calls, finish = reassemble(await chat_stream(auto_client, tools=[WEATHER, PING]))
    assert content == message["content"] and finish == "tool_calls"
    assert [(c["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]
    ]
    assert "<tool_call>" not in content


async def test_auto_without_calls_is_plain_content(auto_client, engine):
    body = await chat(auto_client, tools=[WEATHER])
    choice = body["choices"][0]
    assert choice["message"]["content"] == engine.OUTPUT and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"


async def test_broken_arguments_come_back_as_content(auto_client, engine):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'
    engine.set_output(broken)
    body = await chat(auto_client, tools=[WEATHER])
    assert body["choices"][0]["message"]["content"] == broken
    assert body["choices"][0]["message"]["tool_calls"] == []
    assert body["choices"][0]["finish_reason"] == "stop"
    content, calls, finish = reassemble(await chat_stream(auto_client, tools=[WEATHER]))
    assert (content, calls, finish) == (broken, [], "stop")


async def test_parallel_tool_calls_false_keeps_the_first_call(auto_client, engine):
    engine.set_output(CALL + PING_CALL)
    body = await chat(auto_client, tools=[WEATHER, PING], parallel_tool_calls=False)
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == [
        "get_weather"
    ]
    _, calls, _ = reassemble(
        await chat_stream(auto_client, tools=[WEATHER, PING], parallel_tool_calls=False)
    )
    assert [c["name"] for c in calls] == ["get_weather"]


async def test_each_choice_has_its_own_calls(auto_client, engine):
    engine.set_output(CALL)
    events = await chat_stream(auto_client, tools=[WEATHER], n=2)
    for index in (0, 1):
        _, calls, finish = reassemble(events, index)
        assert [c["name"] for c in calls] == ["get_weather"] and finish == "tool_calls"


async def test_length_keeps_length_and_a_cut_call_is_content(auto_client, engine):
    engine.set_output(CALL)
    body = await chat(auto_client, tools=[WEATHER], max_tokens=6)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] == []
    assert choice["message"]["content"].startswith("<tool_call>")


async def test_forced_calls_without_the_flags(client, engine):
    engine.set_output(CALL)
    body = await chat(client, tools=[WEATHER, PING], tool_choice="required")
    grammar: GrammarSpec = engine.calls[-1]["sampling"].grammar
    assert grammar.kind == "structural_tag"
    tag = json.loads(grammar.spec)["format"]
    assert [t["begin"] for t in tag["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "ping", "arguments": ',
    ]
    assert tag["at_least_one"] and not tag["stop_after_first"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = await chat(client, tools=[WEATHER, PING], tool_choice=named)
    tag = json.loads(engine.calls[-1]["sampling"].grammar.spec)["format"]
    assert len(tag["tags"]) == 1 and tag["stop_after_first"]
    assert body["choices"][0]["finish_reason"] == "stop"  # OpenAI's, for a named function
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    _, calls, finish = reassemble(await chat_stream(client, tools=[WEATHER], tool_choice=named))
    assert finish == "stop" and [c["name"] for c in calls] == ["get_weather"]


async def test_tool_choice_none_renders_tools_but_reads_no_calls(engine):
    engine.set_output(CALL)
    for exclude in (False, True):
        config = ServerConfig(tool_config=ToolConfig(exclude_tools_when_tool_choice_none=exclude))
        client = create_app(engine, config).test_client()
        body = await chat(client, tools=[WEATHER], tool_choice="none")
        assert body["choices"][0]["message"]["content"] == CALL
        assert ("get_weather" in engine.calls[-1]["prompt"]) is not exclude


async def test_the_hermes_template_renders_tools_and_history(client, engine):
    await chat(client, tools=[WEATHER], tool_choice="required", messages=history('{"city": "P"}'))
    prompt = engine.calls[-1]["prompt"]
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P"}}\n</tool_call>' in (
        prompt
    )
    assert '<tool_response id="call_1">\n21 C\n</tool_response>' in prompt
    await chat(client, messages=history({"city": "P"}))  # arguments as an object, no tools
    assert '"arguments": {"city": "P"}' in engine.calls[-1]["prompt"]
    await chat(client)  # no tools: the model's own template (SmolLM's default system prompt)
    assert "SmolLM" in engine.calls[-1]["prompt"]


async def test_chat_template_flag_overrides_every_template(engine):
    config = ServerConfig(chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    client = create_app(engine, config).test_client()
    await chat(client, tools=[WEATHER], tool_choice="required")
    assert engine.calls[-1]["prompt"] == "[Hello]"
    resp = await client.post("/tokenize", json={"messages": MSG})
    assert (await resp.get_json())["count"] == len(engine.tokenizer.encode("[Hello]"))


def test_the_hermes_template_ships_in_the_wheel():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert re.search(r'^api = \[.*"templates/\*\.jinja".*\]$', section, re.M)
