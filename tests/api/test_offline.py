"""The offline `LLM` class on its private loop, against the fake engine."""

from __future__ import annotations

import pytest

from api import LLM, SamplingParams
from api.errors import EngineRequestError
from tests.api.fake_engine import FakeEngine


class FakeLLM(LLM):
    tokenizer = None

    def _make_engine(self):
        return FakeEngine(self.tokenizer, max_model_len=128)


@pytest.fixture(scope="module")
def llm(tokenizer):
    FakeLLM.tokenizer = tokenizer
    engine = FakeLLM(use_tqdm=False)
    yield engine
    engine.shutdown()


@pytest.fixture(autouse=True)
def fresh(llm):
    llm.engine.calls.clear()
    llm.engine.refusal = None


def test_generate_in_prompt_order(llm, tokenizer):
    out_ids = tokenizer.encode(FakeEngine.OUTPUT, add_special_tokens=False)
    prompts = ["The capital of France is", "Hi", "Bonjour"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.prompt for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == tokenizer.encode(prompt)
        [sample] = out.outputs
        assert sample.token_ids == out_ids[:4]
        assert sample.text == tokenizer.decode(out_ids[:4])
        assert sample.finish_reason == "length"
    assert len({o.request_id for o in outputs}) == 3
    # token ids went to the engine, tokenized once here
    assert llm.engine.calls[0]["prompt_token_ids"] == tokenizer.encode(prompts[0])


def test_single_prompt_n_and_default_params(llm):
    [out] = llm.generate("Hi", SamplingParams(n=3, max_tokens=2, logprobs=1))
    assert [s.index for s in out.outputs] == [0, 1, 2]
    assert all(len(s.token_ids) == 2 and len(s.logprobs) == 2 for s in out.outputs)
    [out] = llm.generate({"prompt_token_ids": [1, 2, 3]})
    assert out.prompt_token_ids == [1, 2, 3] and out.prompt is None
    assert llm.engine.calls[-1]["sampling"] == SamplingParams()


def test_invalid_params_raise_value_error(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("Hi", SamplingParams(temperature=5.0))
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate("word " * 200)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])
    assert llm.engine.calls == []


def test_engine_refusal_raises(llm):
    llm.engine.refusal = EngineRequestError(400, "no room")
    with pytest.raises(ValueError, match="no room"):
        llm.generate("Hi")


def test_chat(llm, tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    [out] = llm.chat(messages, SamplingParams(max_tokens=2))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered
    assert out.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert len(llm.chat([messages, messages])) == 2
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "robot", "content": "x"}])


def test_stats_and_shutdown(tokenizer):
    FakeLLM.tokenizer = tokenizer
    llm = FakeLLM(use_tqdm=True)
    assert llm.stats().num_blocks_in_use == 0
    thread = llm._thread
    llm.shutdown()
    llm.shutdown()
    assert not thread.is_alive()
