"""Validation helpers and the chat template, below the HTTP layer."""

from __future__ import annotations

import pytest

from api.chat_template import render_chat
from api.errors import ApiError, EngineRequestError, error_body
from api.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from api.validation import (
    Limits,
    chat_sampling_params,
    completion_prompts,
    decode_body,
    verify_sampling_params,
)
from model_runner.sampling_params import SamplingParams

LIMITS = Limits(vocab_size=100, max_model_len=64, max_logprobs=5)


@pytest.mark.parametrize(("body", "param"), [
    (b'{"n": "x"}', "n"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"messages": [{"content": "x"}]}', "messages[0].role"),
    (b'{"stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
    (b'{"logit_bias": {"1": "x"}}', "logit_bias"),
    (b"[]", None),
    (b"nul", None),
])  # fmt: skip
def test_decode_errors_name_the_field(body, param):
    with pytest.raises(ApiError) as err:
        decode_body(body, ChatCompletionRequest)
    assert err.value.status == 400 and err.value.param == param


def test_unknown_fields_are_ignored():
    req = decode_body(b'{"prompt": "a", "store": true, "modalities": ["text"]}',
                      CompletionRequest)  # fmt: skip
    assert req.prompt == "a" and req.max_tokens == 16


def test_chat_param_names_in_errors():
    req = decode_body(b'{"messages": [], "max_completion_tokens": 100}', ChatCompletionRequest)
    with pytest.raises(ApiError) as err:
        chat_sampling_params(req, LIMITS)
    assert err.value.param == "max_completion_tokens" and "[1, 63]" in err.value.message
    req = decode_body(b'{"messages": [], "logprobs": true, "top_logprobs": 9}',
                      ChatCompletionRequest)  # fmt: skip
    with pytest.raises(ApiError) as err:
        chat_sampling_params(req, LIMITS)
    assert err.value.param == "top_logprobs"


def test_verify_accepts_the_edges():
    edge = SamplingParams(n=128, temperature=2.0, top_p=1.0, top_k=-1, min_p=1.0,
                          presence_penalty=-2.0, frequency_penalty=2.0, seed=-(2**63),
                          max_tokens=63, min_tokens=63, logprobs=5, stop=["x"] * 16,
                          stop_token_ids=[0, 99])  # fmt: skip
    verify_sampling_params(edge, LIMITS)
    verify_sampling_params(SamplingParams(temperature=0, max_tokens=None), LIMITS)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 0.0),
    ("n", True), ("max_tokens", 1.5), ("repetition_penalty", -1.0), ("seed", 2**63),
])  # fmt: skip
def test_verify_rejects(field, value):
    with pytest.raises(ApiError) as err:
        verify_sampling_params(SamplingParams(**{field: value}), LIMITS)
    assert err.value.param == field


def test_completion_prompt_forms():
    def prompts(value):
        return completion_prompts(CompletionRequest(prompt=value, max_tokens=4), LIMITS)

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert prompts(["a", [1]]) == ["a", [1]]
    with pytest.raises(ApiError, match="maximum context length is 64"):
        prompts([1] * 61)


def test_error_bodies():
    e = EngineRequestError(503, "busy", retry_after=0.2)
    assert e.type == "ServiceUnavailableError" and e.headers() == {"Retry-After": "1"}
    assert e.body() == {"error": {"message": "busy", "type": "ServiceUnavailableError",
                                  "param": None, "code": 503}}  # fmt: skip
    assert error_body("x", 404)["error"]["type"] == "NotFoundError"


def test_render_chat(tokenizer):
    msgs = [ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content=[{"type": "text", "text": "Hi"}])]  # fmt: skip
    text = render_chat(tokenizer, msgs).text
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")  # fmt: skip
    no_gen = render_chat(tokenizer, msgs, add_generation_prompt=False).text
    assert not no_gen.endswith("<|im_start|>assistant\n")


def test_render_chat_without_template():
    class Plain:
        chat_template = None

    with pytest.raises(ApiError, match="no chat template"):
        render_chat(Plain(), [ChatMessage(role="user", content="x")])
