"""The real `openai` client against a real server process."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import GREEDY_NEW_TOKENS, GREEDY_PROMPTS


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_completions_greedy_matches_hf(client, model_id, hf_greedy, hf_tokenizer):
    for prompt in GREEDY_PROMPTS[:10]:
        resp = client.completions.create(
            model=model_id, prompt=prompt, max_tokens=GREEDY_NEW_TOKENS, temperature=0
        )
        expected = hf_tokenizer.decode(hf_greedy[prompt], skip_special_tokens=True)
        assert resp.choices[0].text == expected, prompt
        assert resp.usage.completion_tokens == len(hf_greedy[prompt])
        assert resp.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_non_streamed(client, model_id):
    resp = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_text_equals_non_streamed(client, model_id, endpoint):
    kwargs = dict(model=model_id, max_tokens=40, temperature=0)
    if endpoint == "chat":
        create = client.chat.completions.create
        kwargs["messages"] = [{"role": "user", "content": "Write a haiku about the sea."}]
    else:
        create = client.completions.create
        kwargs["prompt"] = "A short poem about autumn:\n"
    full = create(**kwargs)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces, finish = [], None
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1
        c = chunk.choices[0]
        pieces.append((c.delta.content or "") if endpoint == "chat" else c.text)
        finish = c.finish_reason or finish
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    if endpoint == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"
        expected = full.choices[0].message.content
    else:
        expected = full.choices[0].text
    assert "".join(pieces) == expected
    assert finish == full.choices[0].finish_reason
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    # Streaming is token by token: more than a couple of content chunks.
    assert sum(1 for p in pieces if p) > 5


def test_length_finish_and_usage(client, model_id):
    resp = client.completions.create(
        model=model_id, prompt="Count: 1, 2, 3,", max_tokens=7, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 7


def test_n_samples_seeded_reproducible(client, model_id):
    kwargs = dict(model=model_id, prompt="My favourite animal is", max_tokens=12, n=3,
                  temperature=1.0, seed=1234)  # fmt: skip
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
