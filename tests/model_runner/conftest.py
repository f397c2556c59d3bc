"""Model-runner fixtures: the default model loaded ONCE per session in float32 and bfloat16.

The HF reference (`hf_model`, `hf_tokenizer`, `hf_greedy`) comes from tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from model_runner.config import EngineConfig
from model_runner.runner import ModelRunner
from tests.conftest import GREEDY_NEW_TOKENS, GREEDY_PROMPTS

CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three prime numbers."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Explain what a GPU is in one sentence."},
    ],
]

# NOTE: small KV caches keep the fixtures light; 0.4 GiB is 582 blocks of 16 tokens in fp32,
# and its half, the DecodeContext's budget, holds 32 rows of 128 tokens.
RUNNER_KV_GIB = 0.4


@pytest.fixture(scope="package")  # NOTE: freed after tests/model_runner
def runner() -> ModelRunner:
    return ModelRunner(
        EngineConfig(dtype="float32", kv_cache_memory=RUNNER_KV_GIB, max_model_len=2048),
        progress=False,
    )


@pytest.fixture(scope="package")  # NOTE: freed after tests/model_runner
def runner_bf16() -> ModelRunner:
    return ModelRunner(
        EngineConfig(dtype="bfloat16", kv_cache_memory=RUNNER_KV_GIB, max_model_len=2048),
        progress=False,
    )


@pytest.fixture(scope="session")
def chat_prompts(hf_tokenizer) -> list[list[int]]:
    texts = [
        hf_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in CHAT_CONVERSATIONS
    ]
    return [hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="session")
def plain_prompts(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer(p)["input_ids"] for p in GREEDY_PROMPTS]


@pytest.fixture(scope="session")
def reference_cases(
    plain_prompts, chat_prompts, hf_greedy, hf_model
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, HF greedy output ids) for every plain and chat-templated prompt."""
    cases = [(ids, hf_greedy[p]) for ids, p in zip(plain_prompts, GREEDY_PROMPTS, strict=True)]
    for ids in chat_prompts:
        with torch.inference_mode():
            gen = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=GREEDY_NEW_TOKENS,
                do_sample=False,
                top_p=None,
                top_k=None,
            )
        cases.append((ids, gen[0, len(ids) :].tolist()))
    return cases
