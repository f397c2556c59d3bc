"""The Responses API against the fake engine: the 400 table, the store, isolation, aborts."""

from __future__ import annotations

import asyncio
import json

import pytest

from api.responses_store import ResponseStore, owner_of
from api.server import ServerConfig, create_app
from api.tools import ToolConfig
from tests.api.fake_engine import FakeEngine
from tests.api.test_disconnect import wait_for

FN = {"type": "function", "name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
     "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "Hi"}]}, "input[0].role"),
    ({"input": "Hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "truncation": "auto"}, "truncation"),
    ({"input": "Hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "Hi", "top_logprobs": 3}, "top_logprobs"),
    ({"input": "Hi", "max_tool_calls": 2}, "max_tool_calls"),
    ({"input": "Hi", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "Hi", "brand_new_field": 1}, "brand_new_field"),
    ({"input": "Hi", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "Hi", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name"),
    ({"input": "Hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "Hi", "tools": [FN], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"input": "Hi", "tools": [{**FN, "name": "bad name"}], "tool_choice": "required"},
     "tools[0].name"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": 7}, "input"),
], ids=lambda v: v if isinstance(v, str) else None)  # fmt: skip
async def test_unsupported_or_bad_fields_are_400_naming_them(client, engine, body, param):
    resp = await client.post("/v1/responses", json=body)
    assert resp.status_code == 400, await resp.get_data()
    error = (await resp.get_json())["error"]
    assert error["param"] == param and error["type"] == "BadRequestError"
    assert engine.calls == []


async def test_defaults_the_sdks_send_are_accepted(client):
    body = {"input": "Hi", "include": [], "truncation": "disabled", "service_tier": "auto",
            "store": False, "reasoning": None, "max_output_tokens": 4}  # fmt: skip
    resp = await client.post("/v1/responses", json=body)
    assert resp.status_code == 200
    assert (await resp.get_json())["output_text"] == " The quick brown fox"


async def test_unknown_ids_are_404(client):
    resp = await client.post("/v1/responses", json={"input": "Hi", "previous_response_id": "r"})
    assert resp.status_code == 404
    assert (await resp.get_json())["error"]["param"] == "previous_response_id"
    for method in ("GET", "DELETE"):
        resp = await client.open("/v1/responses/resp_unknown", method=method)
        assert resp.status_code == 404
        assert (await resp.get_json())["error"]["type"] == "NotFoundError"


async def test_store_false_keeps_nothing(client):
    resp = await client.post("/v1/responses", json={"input": "Hi", "store": False})
    rid = (await resp.get_json())["id"]
    assert (await client.get(f"/v1/responses/{rid}")).status_code == 404


async def test_one_key_cannot_read_or_delete_anothers_responses(client):
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    resp = await client.post("/v1/responses", json={"input": "Hi"}, headers=alice)
    rid = (await resp.get_json())["id"]
    assert (await client.get(f"/v1/responses/{rid}", headers=bob)).status_code == 404
    assert (await client.delete(f"/v1/responses/{rid}", headers=bob)).status_code == 404
    follow = {"input": "More", "previous_response_id": rid}
    assert (await client.post("/v1/responses", json=follow, headers=bob)).status_code == 404
    assert (await client.get(f"/v1/responses/{rid}", headers=alice)).status_code == 200


async def test_previous_response_continues_the_conversation(client, engine):
    first = await (await client.post("/v1/responses", json={"input": "Hello there"})).get_json()
    body = {"input": "And then?", "previous_response_id": first["id"], "instructions": "Be brief"}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status_code == 200
    prompt = engine.calls[-1]["prompt"]
    order = [prompt.index(s) for s in ("Be brief", "Hello there", first["output_text"],
                                       "And then?")]  # fmt: skip
    assert order == sorted(order)


def test_store_evicts_least_recently_used_by_count_and_bytes():
    store = ResponseStore(max_entries=2, max_bytes=10_000)
    for rid in ("a", "b"):
        assert store.put("k", {"id": rid}, [])
    assert store.get("k", "a") is not None  # a is now the most recent
    store.put("k", {"id": "c"}, [])
    assert [store.get("k", r) is not None for r in "abc"] == [True, False, True]
    small = ResponseStore(max_entries=100, max_bytes=300)
    for rid in "xyz":
        small.put("k", {"id": rid}, [{"text": "w" * 100}])
    assert [small.get("k", r) is not None for r in "xyz"] == [False, True, True]
    assert small.bytes <= 300 and len(small) == 2
    assert not small.put("k", {"id": "huge"}, [{"text": "w" * 400}])
    assert small.get("k", "huge") is None and len(small) == 2
    assert owner_of("Bearer a") != owner_of("Bearer b")


async def test_server_store_limits_evict(engine):
    app = create_app(engine, ServerConfig(responses_store_max_entries=2))
    client = app.test_client()
    ids = []
    for _ in range(3):
        resp = await client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2})
        ids.append((await resp.get_json())["id"])
    statuses = [(await client.get(f"/v1/responses/{rid}")).status_code for rid in ids]
    assert statuses == [404, 200, 200]
    follow = {"input": "Hi", "previous_response_id": ids[0]}
    assert (await client.post("/v1/responses", json=follow)).status_code == 404


async def test_streamed_disconnect_aborts(app, engine):
    engine.delay = 0.01
    headers = {"Content-Type": "application/json"}
    async with app.test_client().request("/v1/responses", method="POST", headers=headers) as conn:
        await conn.send(json.dumps({"input": "Hi", "stream": True}).encode())
        await conn.send_complete()
        chunk = await conn.receive()
        assert chunk.startswith(b"event: response.created\ndata: {")
        await conn.disconnect()
    requests = [c["request_id"] for c in engine.calls]
    await wait_for(lambda: sorted(engine.aborted) == sorted(requests))
    assert engine.finished == []
    await asyncio.sleep(0.05)
    rid = requests[0]
    assert (await app.test_client().get(f"/v1/responses/{rid}")).status_code == 404


def _named_events(raw: bytes) -> list[dict]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            events.append(event)
    return events


async def test_bodies_and_events_validate_strictly_as_the_sdks_types(tokenizer):
    """pydantic validation (not the SDK's lenient construct) of every body and event."""
    from openai.types.responses import Response as SdkResponse
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    engine = FakeEngine(tokenizer)
    engine.set_output('Sure.<tool_call>\n{"name": "get_weather", "arguments": '
                      '{"city": "Paris"}}\n</tool_call>')  # fmt: skip
    app = create_app(engine, ServerConfig(tool_config=ToolConfig(True, "hermes")))
    client = app.test_client()
    body = {"input": "Weather?", "tools": [FN]}
    full = await (await client.post("/v1/responses", json=body)).get_json()
    parsed = SdkResponse.model_validate(full)
    assert [i.type for i in parsed.output] == ["message", "function_call"]
    assert parsed.output_text == "Sure." and parsed.output[1].arguments == '{"city": "Paris"}'
    raw = await (await client.post("/v1/responses", json={**body, "stream": True})).get_data()
    events = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in _named_events(raw)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events if "delta" not in e.type] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    final = events[-1].response
    assert [i.model_dump(exclude={"id", "call_id"}) for i in final.output] == [
        i.model_dump(exclude={"id", "call_id"}) for i in parsed.output
    ]
    assert final.output[1].call_id.startswith("call_")
