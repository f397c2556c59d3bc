"""Response and SSE chunk shapes of chat and completions, against the fake engine."""

from __future__ import annotations

import re

from tests.api.conftest import sse_events
from tests.api.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Hello"}]


def expected_text(tokenizer, max_tokens: int) -> str:
    ids = tokenizer.encode(FakeEngine.OUTPUT, add_special_tokens=False)[:max_tokens]
    return "".join(tokenizer.decode([t]) for t in ids)


async def test_chat_non_streamed_shape(client, engine, tokenizer):
    resp = await client.post(CHAT, json={"model": "fake-model", "messages": MSG, "max_tokens": 5})
    assert resp.status_code == 200
    body = await resp.get_json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_text(tokenizer, 5)
    assert choice["logprobs"] is None
    prompt = tokenizer.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 5,
                             "total_tokens": num_prompt + 5,
                             "prompt_tokens_details": {"cached_tokens": 0},
                             "gpu_seconds": 0.0}  # fmt: skip
    [call] = engine.calls
    assert call["prompt"] == prompt and call["add_special_tokens"] is False
    assert call["sampling"].max_tokens == 5


async def test_chat_defaults_reach_sampling_params(client, engine):
    await client.post(CHAT, json={"messages": MSG})
    sampling = engine.calls[0]["sampling"]
    assert sampling.max_tokens is None  # chat: up to the context limit
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.n) == (1.0, 1.0, 0, 1)
    assert sampling.logprobs is None and sampling.stop == []


async def test_extra_fields_map_to_sampling_params(client, engine):
    body = {"messages": MSG, "max_completion_tokens": 7, "max_tokens": 3, "top_k": 5,
            "min_p": 0.1, "repetition_penalty": 1.2, "stop": "END", "stop_token_ids": [2],
            "ignore_eos": True, "min_tokens": 2, "seed": 11, "logit_bias": {"17": -5.5},
            "include_stop_str_in_output": True, "skip_special_tokens": False,
            "cache_salt": "tenant-a", "some_future_openai_field": {"x": 1},
            "metadata": {"feature": "search"}}  # fmt: skip
    resp = await client.post(CHAT, json=body)
    assert resp.status_code == 200
    call = engine.calls[0]
    s = call["sampling"]
    assert (s.max_tokens, s.top_k, s.min_p, s.repetition_penalty) == (7, 5, 0.1, 1.2)
    assert (s.stop, s.stop_token_ids, s.ignore_eos, s.min_tokens, s.seed) == (
        ["END"], [2], True, 2, 11)  # fmt: skip
    assert s.logit_bias == {17: -5.5}
    assert s.include_stop_str_in_output and not s.skip_special_tokens
    assert call["cache_salt"] == "tenant-a"


async def test_chat_text_parts_are_joined(client, engine):
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    await client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]})
    assert "<|im_start|>user\none\ntwo<|im_end|>" in engine.calls[0]["prompt"]


async def test_chat_stream_shape(client, tokenizer):
    resp = await client.post(CHAT, json={"messages": MSG, "max_tokens": 4, "stream": True})
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/event-stream")
    events = sse_events(await resp.get_data())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert first["finish_reason"] is None
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == expected_text(tokenizer, 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:]] == [None] * 3 + ["length"]
    assert len(chunks) == 5  # role chunk + one per token


async def test_include_usage_final_chunk(client):
    body = {"messages": MSG, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(await (await client.post(CHAT, json=body)).get_data())
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)  # OpenAI: null until the last chunk
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3
    u = usage_chunk["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + 3 and u["prompt_tokens"] > 0


async def test_continuous_usage_stats(client):
    body = {
        "prompt": "Hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    events = sse_events(await (await client.post(COMPLETIONS, json=body)).get_data())
    assert [c["usage"]["completion_tokens"] for c in events[:-1]] == [1, 2, 3, 3]


async def test_chat_n_streams_interleave(client, tokenizer):
    body = {"messages": MSG, "max_tokens": 3, "n": 3, "stream": True}
    events = sse_events(await (await client.post(CHAT, json=body)).get_data())
    chunks = events[:-1]
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes[:3] == [0, 1, 2]  # role chunks first
    assert indexes[3:] == [0, 1, 2] * 3  # then the samples' tokens interleaved
    for i in range(3):
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[3:]
                       if c["choices"][0]["index"] == i)  # fmt: skip
        assert text == expected_text(tokenizer, 3)


async def test_chat_logprobs(client, tokenizer):
    body = {"messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    body = await (await client.post(CHAT, json=body)).get_json()
    content = body["choices"][0]["logprobs"]["content"]
    first = tokenizer.encode(FakeEngine.OUTPUT, add_special_tokens=False)[0]
    token = tokenizer.decode([first])
    assert content[0]["token"] == token and content[0]["logprob"] == -0.5
    assert content[0]["bytes"] == list(token.encode())
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.5]
    assert len(content) == 2


async def test_completion_non_streamed_shape(client, engine, tokenizer):
    resp = await client.post(COMPLETIONS, json={"prompt": "Say hi", "max_tokens": 6})
    body = await resp.get_json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == expected_text(tokenizer, 6)
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = len(tokenizer.encode("Say hi"))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == 6
    assert engine.calls[0]["add_special_tokens"] is True
    assert engine.calls[0]["sampling"].max_tokens == 6


async def test_completion_default_max_tokens_is_16_and_stop_finish(client, engine):
    body = await (await client.post(COMPLETIONS, json={"prompt": "Hi"})).get_json()
    assert engine.calls[0]["sampling"].max_tokens == 16
    # the canned output is shorter than 16 tokens: it ends with "stop"
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_completion_batch_prompts_and_n(client, engine, tokenizer):
    body = {"prompt": ["First", "Second"], "max_tokens": 2, "n": 2}
    body = await (await client.post(COMPLETIONS, json=body)).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert len({c["request_id"] for c in engine.calls}) == 2
    assert [c["prompt"] for c in engine.calls] == ["First", "Second"]
    n_prompt = len(tokenizer.encode("First")) + len(tokenizer.encode("Second"))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == 8


async def test_completion_token_prompts(client, engine):
    for prompt, expected in (([1, 2, 3], [[1, 2, 3]]), ([[4, 5], [6]], [[4, 5], [6]])):
        engine.calls.clear()
        resp = await client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2})
        body = await resp.get_json()
        assert [c["prompt_token_ids"] for c in engine.calls] == expected
        assert all(c["prompt"] is None for c in engine.calls)
        assert body["usage"]["prompt_tokens"] == sum(map(len, expected))


async def test_completion_batch_stream(client):
    body = {"prompt": ["a", "b"], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(await (await client.post(COMPLETIONS, json=body)).get_data())
    chunks = events[:-2]
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 0, 1, 1]
    assert all(c["object"] == "text_completion" for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes.count("length") == 2
    assert events[-2]["usage"]["completion_tokens"] == 4 and events[-2]["choices"] == []
    assert events[-1] == "[DONE]"


async def test_completion_logprobs_and_echo(client, tokenizer):
    body = {"prompt": "Echo me", "max_tokens": 3, "logprobs": 1, "echo": True}
    choice = (await (await client.post(COMPLETIONS, json=body)).get_json())["choices"][0]
    assert choice["text"] == "Echo me" + expected_text(tokenizer, 3)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["token_logprobs"] == [-0.5] * 3
    assert lp["text_offset"][0] == len("Echo me")
    assert lp["text_offset"][1] == len("Echo me") + len(lp["tokens"][0])
    assert all(len(top) == 1 for top in lp["top_logprobs"])
    stream = {**body, "stream": True}
    events = sse_events(await (await client.post(COMPLETIONS, json=stream)).get_data())
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == choice["text"]
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in events[:-1]] == \
        lp["text_offset"]  # fmt: skip


async def test_cached_tokens_in_usage(client, engine):
    engine.cached_tokens = 16
    body = await (await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1})).get_json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}


async def test_engine_error_mid_stream_is_an_error_event(client, engine):
    engine.fail_at = 1
    body = {"prompt": "Hi", "max_tokens": 5, "stream": True}
    resp = await client.post(COMPLETIONS, json=body)
    assert resp.status_code == 200
    events = sse_events(await resp.get_data())
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 500
    assert events[0]["choices"][0]["text"]
