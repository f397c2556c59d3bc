"""Draft-model speculation through the whole engine on tiny random models (float32, CPU):
greedy output as without speculation, blocks all returned (also under preemption), the
sampled law of the first tokens unchanged, seeded runs reproducible, start-up errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from api import LLM, SamplingParams
from model_runner.config import EngineConfigError
from tests.conftest import settled_stats

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None,
              rope_theta=500.0, tie_word_embeddings=False)  # fmt: skip
PROMPTS = [[5, 17, 99, 3, 42, 8], [7, 7, 7], [100, 1, 64, 33, 2, 90, 12, 6, 50, 23, 14, 120]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders: the target (peaked logits, so that a few thousand samples pin down the law
    of its first tokens), a draft near it (some proposals hold), a random dummy config."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    target = tmp_path_factory.mktemp("target")
    model.save_pretrained(target)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    near = tmp_path_factory.mktemp("near")
    model.save_pretrained(near)
    dummy = tmp_path_factory.mktemp("dummy") / "config.json"
    dummy.write_text(json.dumps({**COMMON, "model_type": "llama", "hidden_size": 32,
                                 "intermediate_size": 48, "num_hidden_layers": 1}))  # fmt: skip
    return {"target": str(target), "near": str(near), "dummy": str(dummy)}


def engine(models, draft: str | None = None, k: int = 3, **kw) -> LLM:
    spec = None
    if draft is not None:
        spec = {
            "method": "draft_model",
            "model": models[draft],
            "num_speculative_tokens": k,
            "disable_by_batch_size": None,
        }  # NOTE: these tests speculate among 16 rows
    kw = {"kv_cache_memory": 0.01, "max_model_len": 256, "max_waiting": 4096, **kw}
    return LLM(models["target"], dtype="float32", skip_tokenizer_init=True, use_tqdm=False,
               speculative_config=spec, **kw)  # fmt: skip


def run(llm: LLM, prompts, params) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain(models):
    llm = engine(models)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("draft, k", [("target", 4), ("near", 3), ("dummy", 2)])
def test_greedy_output_is_unchanged_and_blocks_come_back(models, plain, draft, k):
    want = run(plain, PROMPTS, GREEDY)
    llm = engine(models, draft, k)
    try:
        together = run(llm, PROMPTS, GREEDY)
        alone = run(llm, PROMPTS[:1], GREEDY)
        stats = settled_stats(llm)
        (scheduler,) = [a for a in llm.engine.local_actors if a.name == "scheduler"]
        scheduler.policy.blocks.check_invariants()
    finally:
        llm.shutdown()
    assert together == want and alone == want[:1]
    assert stats.num_blocks_in_use == 0
    spec = stats.spec
    assert spec.num_drafts > 0 and len(spec.accepted_per_pos) == k
    rate = spec.num_accepted_tokens / spec.num_draft_tokens
    if draft == "target":  # the target as its own draft: every proposal holds
        assert rate >= 0.99
    elif draft == "dummy":  # random weights: almost nothing holds
        assert rate < 0.2
    else:
        assert 0 < rate < 1


def test_logprobs_are_the_targets_for_every_kept_token(models, plain):
    """Greedy and sampled rows: each kept token's logprobs are the target's at its place."""
    params = [SamplingParams(temperature=0.0, max_tokens=16, logprobs=2),
              SamplingParams(temperature=0.7, seed=5, max_tokens=16, logprobs=2)]  # fmt: skip
    prompts = [{"prompt_token_ids": PROMPTS[0]}] * 2
    llm = engine(models, "near", 3)
    try:
        got = [o.outputs[0] for o in llm.generate(prompts, params)]
        accepted = settled_stats(llm).spec.num_accepted_tokens
    finally:
        llm.shutdown()
    assert accepted > 0
    # the plain engine scores the same tokens: teacher-force them as a prompt, one by one
    for out in got:
        for i, entry in enumerate(out.logprobs):
            prefix = PROMPTS[0] + out.token_ids[:i]
            (ref,) = plain.generate(
                [{"prompt_token_ids": prefix}],
                SamplingParams(temperature=0.0, max_tokens=1, logprobs=2),
            )
            top = dict((t, lp) for t, _, lp in ref.outputs[0].logprobs[0].top)
            assert entry.token_id == out.token_ids[i]
            if entry.token_id in top:
                assert entry.logprob == pytest.approx(top[entry.token_id], abs=1e-4)
            for t, _, lp in entry.top:
                assert lp == pytest.approx(top[t], abs=1e-4)


def test_chunked_prefill_and_forks_fill_the_drafts_cache_too(models, plain):
    """Prompts in chunks of 5 and n = 2 (forked blocks copied on write): the target as its
    own draft still sees every proposal hold, so the draft's cache had every token."""
    params = SamplingParams(temperature=0.0, max_tokens=16, n=2)
    want = run(plain, PROMPTS, params)
    llm = engine(models, "target", 3, max_num_batched_tokens=5)
    try:
        got = run(llm, PROMPTS, params)
        stats = settled_stats(llm)
    finally:
        llm.shutdown()
    assert got == want and stats.num_blocks_in_use == 0
    assert stats.spec.num_accepted_tokens >= 0.99 * stats.spec.num_draft_tokens > 0


def test_preempted_speculating_rows_give_the_plain_output(models, plain):
    """A cache of 12 blocks for 16 concurrent requests: rows are preempted by recompute
    (the draft's cache refills with the target's) and output still holds."""
    prompts = [PROMPTS[i % 3] + [i] for i in range(16)]
    want = run(plain, prompts, GREEDY)
    per_block = 2 * 2 * 16 * 2 * 16 * 4 * 2  # K, V; 2 layers; 16 tokens; 2 heads of 16; 2 models
    llm = engine(models, "near", 3, kv_cache_memory=12 * per_block / 2**30, max_model_len=48)
    try:
        got = run(llm, prompts, GREEDY)
        stats = settled_stats(llm)
    finally:
        llm.shutdown()
    assert stats.num_preemptions > 0 and stats.num_blocks_in_use == 0
    assert stats.spec.num_accepted_tokens > 0
    assert got == want


def test_sampled_first_tokens_keep_their_law(models, plain):
    """2,000 seeded samples (temperature 0.7, top-p 0.9) of the first 3 tokens with the near
    draft against as many plain ones under other seeds: total variation <= 0.05 (two plain
    runs differ by about 0.013). Seeded runs repeat exactly."""
    n = 2000
    prompt = [PROMPTS[0]] * n

    def params(offset: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.7, top_p=0.9, seed=offset + s, max_tokens=6)
                for s in range(n)]  # fmt: skip

    without = Counter(tuple(t[:3]) for t in run(plain, prompt, params(n)))
    llm = engine(models, "near", 3)
    try:
        first = run(llm, prompt, params(0))
        again = run(llm, prompt[:200], params(0)[:200])
        spec = settled_stats(llm).spec
    finally:
        llm.shutdown()
    assert again == first[:200]
    assert spec.accepted_per_pos[1] > 0  # accepted and rejected proposals both occur
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    with_draft = Counter(tuple(t[:3]) for t in first)
    tv = 0.5 * sum(abs(without[k] - with_draft[k]) for k in without | with_draft) / n
    assert tv <= 0.05, tv


def test_bad_drafts_are_start_up_errors(models, tmp_path):
    wrong_vocab = tmp_path / "config.json"
    wrong_vocab.write_text(json.dumps({**COMMON, "model_type": "llama", "vocab_size": 256}))
    cases = [
        (str(tmp_path / "missing.gguf"), "does not exist"),
        (str(wrong_vocab), r"vocabulary of 256 tokens, the target .* one of 128"),
    ]
    for path, message in cases:
        with pytest.raises(EngineConfigError, match=message):
            LLM(models["target"], dtype="float32", skip_tokenizer_init=True, use_tqdm=False,
                speculative_config={"method": "draft_model", "model": path})  # fmt: skip


def test_another_tokenizer_or_tensor_parallelism_is_refused(models, tmp_path):
    """Same vocabulary size, other token strings: refused; so is a draft with -tp 2."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from model_runner.config import EngineConfig, SpeculativeConfig
    from model_runner.draft_model import resolve_draft
    from model_runner.model_source import model_config_from_hf, resolve_model

    def folder(name: str, words: list[str]) -> str:
        path = tmp_path / name
        shutil.copytree(models["target"], path)
        tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
        return str(path)

    words = [f"w{i}" for i in range(128)]
    target, same, other = folder("t", words), folder("s", words), folder("o", words[::-1])

    def check(draft: str, **kw) -> None:
        spec = SpeculativeConfig(method="draft_model", model=draft)
        config = EngineConfig(model=target, speculative_config=spec, **kw)
        source = resolve_model(config)
        resolve_draft(config, model_config_from_hf(source.config_path), source)

    check(same)
    with pytest.raises(EngineConfigError, match="another tokenizer than the target"):
        check(other)
    with pytest.raises(EngineConfigError, match="tensor-parallel-size 1"):
        check(same, tensor_parallel_size=2)
