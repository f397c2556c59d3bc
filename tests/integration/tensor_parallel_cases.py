"""Shared cases of the tensor-parallel tests: small dummy-weight configs, prompts, and the
TP=2 vs TP=1 comparison (the same greedy tokens wherever they are not a near tie)."""

from __future__ import annotations

import json
from pathlib import Path

# Heads fewer KV heads than ranks (replicated under TP=2), tied embeddings, q/k/v biases.
GQA_ONE_KV_HEAD = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "max_position_embeddings": 1024,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 1024,
}
# The default model's head counts (9 heads, 3 KV heads): TP=2 must refuse it.
NINE_HEADS = {**GQA_ONE_KV_HEAD, "hidden_size": 144, "num_attention_heads": 9,
              "num_key_value_heads": 3}  # fmt: skip

NUM_PROMPTS, MAX_TOKENS = 10, 32
TIE_MARGIN = 1e-3  # top-2 logprob gap below which either token is a right greedy answer
LOGPROB_TOLERANCE = 1e-4


def write_config(folder: Path, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def prompts() -> list[list[int]]:
    """Ten prompts of 5-40 tokens; the last four share a 32-token prefix (prefix caching)."""
    shared = [(7 * i + 3) % 1000 + 10 for i in range(32)]
    own = [[(31 * i + 17 * j) % 1000 + 10 for j in range(5 + 4 * i)] for i in range(6)]
    return own + [shared + [100 + i, 200 + i] for i in range(4)]


def engine_kwargs(**extra) -> dict:
    return dict(load_format="dummy", dtype="float32", skip_tokenizer_init=True,
                max_model_len=256, enforce_eager=True, **extra)  # fmt: skip


class Generation:
    """One sequence's greedy tokens, their logprobs, and the top-2 margin at each step."""

    def __init__(self, token_ids: list[int], logprobs: list[float], margins: list[float]):
        self.token_ids, self.logprobs, self.margins = token_ids, logprobs, margins


def offline_generations(llm) -> list[Generation]:
    from api import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    found = []
    for out in outputs:
        c = out.outputs[0]
        margins = [lp.top[0][2] - lp.top[1][2] for lp in c.logprobs]
        found.append(Generation(c.token_ids, [lp.logprob for lp in c.logprobs], margins))
    return found


def assert_matches(reference: list[Generation], other: list[Generation]) -> int:
    """Tokens equal up to the first near tie of the reference (then the contexts differ),
    logprobs within LOGPROB_TOLERANCE until then. Returns the tokens compared."""
    compared = 0
    assert len(reference) == len(other)
    for i, (ref, got) in enumerate(zip(reference, other, strict=True)):
        assert len(got.token_ids) == len(ref.token_ids) == MAX_TOKENS
        for t, (a, b) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)):
            if a != b:
                assert ref.margins[t] <= TIE_MARGIN, (i, t, a, b, ref.margins[t])
                break
            assert abs(ref.logprobs[t] - got.logprobs[t]) <= LOGPROB_TOLERANCE, (i, t)
            compared += 1
    return compared
