"""The Responses API on a real server, through the real `openai` SDK and the Agents SDK."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseTextDeltaEvent,
)

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": CITY, "strict": True}  # fmt: skip
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.base_url + "/v1", api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _chat_text(client, model_id, messages, max_tokens):
    chat = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return chat.choices[0].message.content, chat


def test_text_streamed_and_not_equal_each_other_and_chat(client, model_id):
    expected, chat = _chat_text(client, model_id, [{"role": "user", "content": QUESTION}], 24)
    resp = client.responses.create(
        model=model_id, input=QUESTION, max_output_tokens=24, temperature=0
    )
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == expected and "Paris" in expected
    assert resp.status == (
        "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    )
    assert [item.type for item in resp.output] == ["message"]
    usage = resp.usage
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens > 0  # the chat request's prompt, cached
    assert usage.model_extra["gpu_seconds"] > 0

    events = list(client.responses.create(
        model=model_id, input=QUESTION, max_output_tokens=24, temperature=0, stream=True
    ))  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert isinstance(events[0], ResponseCreatedEvent) and events[1].type == "response.in_progress"
    assert [e.type for e in events[2:4]] == ["response.output_item.added",
                                             "response.content_part.added"]  # fmt: skip
    deltas = [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert len(deltas) > 5 and "".join(deltas) == expected
    tail = [e.type for e in events[-4:]]
    final = "response.incomplete" if resp.status == "incomplete" else "response.completed"
    assert tail == ["response.output_text.done", "response.content_part.done",
                    "response.output_item.done", final]  # fmt: skip
    assert events[-1].response.output_text == expected
    assert events[-1].response.usage.output_tokens == usage.output_tokens


def test_stream_helper_accumulates_the_same_response(client, model_id):
    """The SDK's own stream accumulator checks every event against the state it builds."""
    kwargs = dict(model=model_id, input="Name three colors.", max_output_tokens=16, temperature=0)
    with client.responses.stream(**kwargs) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text == client.responses.create(**kwargs).output_text


def _forced_call(client, model_id, **kwargs):
    return client.responses.create(
        model=model_id, input="What is the weather in Paris?", tools=[WEATHER],
        parallel_tool_calls=False, temperature=0, max_output_tokens=64, **kwargs,
    )  # fmt: skip


def _checked_call(resp):
    assert resp.status == "completed"
    [call] = [item for item in resp.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), CITY)
    return call


def test_named_function_call(client, model_id):
    _checked_call(_forced_call(client, model_id, tool_choice={"type": "function",
                                                              "name": "get_weather"}))  # fmt: skip


def test_required_function_call_streamed_and_its_round_trip(client, model_id):
    resp = _forced_call(client, model_id, tool_choice="required")
    call = _checked_call(resp)
    events = list(_forced_call(client, model_id, tool_choice="required", stream=True))
    deltas = [e.delta for e in events if isinstance(e, ResponseFunctionCallArgumentsDeltaEvent)]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments == call.arguments
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert events[-1].response.output[-1].arguments == call.arguments

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"}
    rest = dict(tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=8)
    follow = client.responses.create(
        model=model_id, previous_response_id=resp.id, input=[result], **rest
    )
    question = {"role": "user", "content": "What is the weather in Paris?"}
    explicit = client.responses.create(
        model=model_id, input=[question, call.model_dump(), result], store=False, **rest
    )
    assert follow.output_text and follow.output_text == explicit.output_text
    assert [i.type for i in follow.output] == ["message"]
    assert follow.usage.input_tokens == explicit.usage.input_tokens


def test_json_schema_output_validates(client, model_id):
    schema = {"type": "object", "properties": {"city": {"type": "string"},
              "country": {"type": "string"}}, "required": ["city", "country"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    resp = client.responses.create(
        model=model_id, input="Name a city and its country as JSON.", text={"format": fmt},
        temperature=0, max_output_tokens=64,
    )  # fmt: skip
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text.format.type == "json_schema"


def test_previous_response_id_continues_like_the_whole_chat(client, model_id):
    first = client.responses.create(
        model=model_id, input="My name is Ada. Say hello.", temperature=0, max_output_tokens=8
    )
    second = client.responses.create(
        model=model_id, input="What is my name?", previous_response_id=first.id, temperature=0,
        max_output_tokens=12,
    )  # fmt: skip
    messages = [{"role": "user", "content": "My name is Ada. Say hello."},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"}]  # fmt: skip
    expected, _ = _chat_text(client, model_id, messages, 12)
    assert second.output_text == expected
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(second.id).output_text == expected
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model_id, input="Hi", previous_response_id=second.id)


def test_unsupported_fields_are_400_through_the_sdk(client, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_id, input="Hi", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"


def test_an_agent_calls_its_tool_and_finishes(tool_server, model_id):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    async def run():
        client = openai.AsyncOpenAI(base_url=tool_server.base_url + "/v1", api_key="k")
        agent = Agent(
            name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
            model=OpenAIResponsesModel(model=model_id, openai_client=client),
            model_settings=ModelSettings(
                tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64
            ),
            tool_use_behavior="stop_on_first_tool",  # NOTE: a 135M model's answers ramble on
        )  # fmt: skip
        return await Runner.run(agent, "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"It is sunny in {calls[0]}."
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item"]
