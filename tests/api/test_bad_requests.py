"""Every bad request gets its 4xx with OpenAI's error body naming the field; nothing reaches
the engine, and the server keeps answering."""

from __future__ import annotations

import pytest

from api.errors import EngineRequestError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"messages": MSG, **fields}


def completion(**fields) -> dict:
    return {"prompt": "Hello", **fields}


# (id, path, json body or raw bytes, status, param)
CASES = [
    ("invalid-json", CHAT, b"{not json", 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("array-body", COMPLETIONS, [1, 2], 400, None),
    ("missing-messages", CHAT, {"model": "fake-model"}, 400, "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("messages-not-list", CHAT, {"messages": "hi"}, 400, "messages"),
    ("message-without-role", CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("unknown-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("message-without-content", CHAT, {"messages": [{"role": "user"}]}, 400,
     "messages[0].content"),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "messages[0].content[0].type"),
    ("unknown-model", CHAT, chat(model="gpt-4"), 404, "model"),
    ("unknown-model-completions", COMPLETIONS, completion(model="nope"), 404, "model"),
    ("n-zero", CHAT, chat(n=0), 400, "n"),
    ("n-too-large", CHAT, chat(n=129), 400, "n"),
    ("n-string", CHAT, chat(n="2"), 400, "n"),
    ("n-float", COMPLETIONS, completion(n=1.0), 400, "n"),
    ("n-bool", COMPLETIONS, completion(n=True), 400, "n"),
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, "temperature"),
    ("temperature-too-high", COMPLETIONS, completion(temperature=2.5), 400, "temperature"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top-p-above-one", COMPLETIONS, completion(top_p=1.5), 400, "top_p"),
    ("top-k-below-minus-one", CHAT, chat(top_k=-2), 400, "top_k"),
    ("min-p-above-one", CHAT, chat(min_p=1.5), 400, "min_p"),
    ("presence-penalty", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty", COMPLETIONS, completion(frequency_penalty=-2.5), 400,
     "frequency_penalty"),
    ("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400,
     "max_completion_tokens"),
    ("max-tokens-beyond-context", COMPLETIONS, completion(max_tokens=10**6), 400, "max_tokens"),
    ("max-tokens-negative", COMPLETIONS, completion(max_tokens=-1), 400, "max_tokens"),
    ("min-tokens-above-max", COMPLETIONS, completion(max_tokens=4, min_tokens=5), 400,
     "min_tokens"),
    ("top-logprobs-above-max", CHAT, chat(logprobs=True, top_logprobs=6), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("logprobs-above-max", COMPLETIONS, completion(logprobs=6), 400, "logprobs"),
    ("logprobs-bool-for-completions", COMPLETIONS, completion(logprobs=True), 400, "logprobs"),
    ("too-many-stops", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("empty-stop", COMPLETIONS, completion(stop=["ok", ""]), 400, "stop"),
    ("stop-not-string", COMPLETIONS, completion(stop=[1]), 400, "stop[0]"),
    ("stop-token-out-of-vocab", CHAT, chat(stop_token_ids=[49152]), 400, "stop_token_ids"),
    ("logit-bias-key", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-out-of-vocab", CHAT, chat(logit_bias={"49152": 1}), 400, "logit_bias"),
    ("logit-bias-value", COMPLETIONS, completion(logit_bias={"5": 101}), 400, "logit_bias"),
    ("logit-bias-key-not-ascii-digits", CHAT, chat(logit_bias={"١٢": 1}), 400, "logit_bias"),
    ("logit-bias-key-signed", CHAT, chat(logit_bias={"+12": 1}), 400, "logit_bias"),
    ("logit-bias-too-many", CHAT, chat(logit_bias={str(i): 1 for i in range(1025)}), 400,
     "logit_bias"),
    ("stop-too-long", CHAT, chat(stop=["x" * 257]), 400, "stop"),
    ("too-many-messages", CHAT, {"messages": MSG * 2049}, 400, "messages"),
    ("seed-out-of-range", CHAT, chat(seed=2**64), 400, "seed"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("beam-search", CHAT, chat(use_beam_search=True), 400, "use_beam_search"),
    ("best-of", COMPLETIONS, completion(best_of=3), 400, "best_of"),
    ("prompt-logprobs", COMPLETIONS, completion(prompt_logprobs=1), 400, "prompt_logprobs"),
    ("response-format-json-schema-missing", CHAT, chat(response_format={"type": "json_schema"}),
     400, "response_format.json_schema"),
    ("tool-choice-required", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("request-chat-template", CHAT, chat(chat_template="{{ 'x' }}"), 400, "chat_template"),
    ("reserved-template-kwarg", CHAT, chat(chat_template_kwargs={"tokenize": True}), 400,
     "chat_template_kwargs"),
    ("both-generation-and-continue", CHAT, chat(continue_final_message=True), 400,
     "continue_final_message"),
    ("empty-cache-salt", CHAT, chat(cache_salt=""), 400, "cache_salt"),
    ("metadata-too-many", CHAT, chat(metadata={str(i): "v" for i in range(17)}), 400,
     "metadata"),
    ("metadata-not-string", CHAT, chat(metadata={"feature": 1}), 400, "metadata"),
    ("priority", CHAT, chat(priority=1), 400, "priority"),
    ("suffix", COMPLETIONS, completion(suffix="x"), 400, "suffix"),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("empty-prompt", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("empty-prompt-list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("empty-token-list", COMPLETIONS, completion(prompt=[[]]), 400, "prompt"),
    ("empty-string-in-batch", COMPLETIONS, completion(prompt=["a", ""]), 400, "prompt"),
    ("mixed-prompt", COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt"),
    ("prompt-dict", COMPLETIONS, completion(prompt={"text": "a"}), 400, "prompt"),
    ("token-out-of-vocab", COMPLETIONS, completion(prompt=[1, 49152]), 400, "prompt"),
    ("token-negative", COMPLETIONS, completion(prompt=[-1]), 400, "prompt"),
    ("token-bool", COMPLETIONS, completion(prompt=[True]), 400, "prompt"),
    ("token-out-of-vocab-in-batch", COMPLETIONS, completion(prompt=[[1], [10**12]]), 400,
     "prompt"),
    ("token-prompt-too-long", COMPLETIONS, completion(prompt=[5] * 600), 400, "prompt"),
    ("token-prompt-plus-max-tokens", COMPLETIONS, completion(prompt=[5] * 500, max_tokens=20),
     400, "max_tokens"),
    ("too-many-prompts", COMPLETIONS, completion(prompt=["a"] * 257), 400, "prompt"),
    ("tokenize-neither", "/tokenize", {"model": "fake-model"}, 400, "prompt"),
    ("tokenize-unknown-model", "/tokenize", {"model": "x", "prompt": "a"}, 404, "model"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 49152]}, 400, "tokens"),
    ("detokenize-missing-tokens", "/detokenize", {}, 400, "tokens"),
]  # fmt: skip


async def post(client, path, body):
    if isinstance(body, bytes):
        return await client.post(path, data=body, headers={"Content-Type": "application/json"})
    return await client.post(path, json=body)


async def assert_alive(client) -> None:
    resp = await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200
    assert (await resp.get_json())["usage"]["completion_tokens"] == 2


def _streamed(case: tuple) -> tuple | None:
    name, path, body, status, param = case
    if path not in (CHAT, COMPLETIONS) or not isinstance(body, dict) or "stream_options" in body:
        return None
    return (f"{name}-stream", path, {**body, "stream": True}, status, param)


ALL_CASES = CASES + [s for s in map(_streamed, CASES) if s is not None]


@pytest.mark.parametrize(("path", "body", "status", "param"),
                         [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])  # fmt: skip
async def test_bad_request(client, engine, path, body, status, param):
    resp = await post(client, path, body)
    assert resp.status_code == status
    assert resp.content_type == "application/json"
    error = (await resp.get_json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert error["message"]
    assert engine.calls == [], "a bad request reached the engine"
    await assert_alive(client)


async def test_engine_refusal_keeps_its_status(client, engine):
    """Prompt too long for the context: the engine refuses before the first delta."""
    long_text = "word " * 600
    for stream in (False, True):
        resp = await client.post(COMPLETIONS, json={"prompt": long_text, "stream": stream})
        assert resp.status_code == 400
        assert (await resp.get_json())["error"]["param"] == "max_tokens"
    assert engine.aborted == [] and engine.finished == []
    await assert_alive(client)


@pytest.mark.parametrize("stream", [False, True])
async def test_busy_engine_answers_503_with_retry_after(client, engine, stream):
    engine.refusal = EngineRequestError(503, "waiting queue full", "ServiceUnavailableError",
                                        code="queue_full", retry_after=2.4)  # fmt: skip
    resp = await client.post(CHAT, json=chat(stream=stream))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "2"
    error = (await resp.get_json())["error"]
    assert error == {"message": "waiting queue full", "type": "ServiceUnavailableError",
                     "param": None, "code": "queue_full"}  # fmt: skip
    engine.refusal = None
    await assert_alive(client)


async def test_unknown_route_and_method_are_json(client):
    resp = await client.get("/v1/nothing")
    assert resp.status_code == 404
    assert (await resp.get_json())["error"]["type"] == "NotFoundError"
    resp = await client.get(CHAT)
    assert resp.status_code == 405
    assert (await resp.get_json())["error"]["code"] == 405


async def test_engine_error_mid_request_is_500(client, engine):
    engine.fail_at = 2
    resp = await client.post(COMPLETIONS, json=completion(max_tokens=8))
    assert resp.status_code == 500
    assert (await resp.get_json())["error"]["type"] == "InternalServerError"
    engine.fail_at = None
    await assert_alive(client)
