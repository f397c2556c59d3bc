"""Greedy output of the whole engine (offline `LLM`) against HF transformers, float32 CPU."""

from __future__ import annotations

import re

import pytest

from api import LLM, SamplingParams
from model_runner.sampling_params import GrammarSpec
from tests.conftest import GREEDY_NEW_TOKENS, GREEDY_PROMPTS, settled_stats

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_NEW_TOKENS)


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="float32", kv_cache_memory=0.5, max_model_len=2048)
    yield engine
    engine.shutdown()


def token_ids(outputs) -> dict[str, list[int]]:
    return {o.prompt: o.outputs[0].token_ids for o in outputs}


def test_batched_greedy_matches_hf(llm, hf_greedy):
    got = token_ids(llm.generate(GREEDY_PROMPTS, GREEDY))
    for prompt in GREEDY_PROMPTS:
        assert got[prompt] == hf_greedy[prompt], prompt


def test_alone_equals_among_sixteen(llm, hf_greedy):
    prompts = (GREEDY_PROMPTS * 2)[:16]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    for prompt, ids in zip(prompts, together, strict=True):
        alone = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
        assert alone == ids == hf_greedy[prompt], prompt


def test_overlap_rows_run_as_configured(llm, hf_greedy):
    """With async scheduling (overlap) the runner fills placeholder rows from the step before
    (and the decode context still appends); without it none are sent. Greedy output holds."""
    (executor,) = [a for a in llm.engine.local_actors if a.name == "executor"]
    runner = executor.runner
    counts, real_take = {"placeholders": 0, "appends": 0}, runner.last_sampled.take
    real_plan = runner.paths.decode_context.plan

    def take(step):
        counts["placeholders"] += sum(c.num_placeholders for c in step.chunks)
        return real_take(step)

    def plan(*args):
        planned = real_plan(*args)
        counts["appends"] += planned is not None and planned.append
        return planned

    runner.last_sampled.take, runner.paths.decode_context.plan = take, plan
    try:
        got = token_ids(llm.generate(GREEDY_PROMPTS[:4], GREEDY))
    finally:
        runner.last_sampled.take, runner.paths.decode_context.plan = real_take, real_plan
    assert all(got[p] == hf_greedy[p] for p in GREEDY_PROMPTS[:4])
    assert counts["appends"] > 0
    if llm.config.async_scheduling:
        assert counts["placeholders"] > 0
    else:
        assert counts["placeholders"] == 0


def test_launching_before_collecting_keeps_every_output(llm, hf_greedy):
    """The GPU's order on the CPU: a step's forward is queued before the previous step's
    tokens are read, so sequences have a pending token while the next step is built. Greedy
    output still equals HF's; seeded draws with penalties and logprobs equal the CPU order's."""
    (executor,) = [a for a in llm.engine.local_actors if a.name == "executor"]
    runner = executor.runner
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12,
                             frequency_penalty=0.5, logprobs=2)  # fmt: skip
    prompts = GREEDY_PROMPTS[:6]
    before = [o.outputs[0] for o in llm.generate(prompts, sampled)]
    pending, real_forward = [0], runner._forward

    def forward(step, inputs):
        pending[0] += sum(s.num_pending for s in runner._seqs.values())
        return real_forward(step, inputs)

    runner.collect_after_forward, runner._forward = True, forward
    try:
        greedy = token_ids(llm.generate(GREEDY_PROMPTS, GREEDY))
        after = [o.outputs[0] for o in llm.generate(prompts, sampled)]
    finally:
        runner.collect_after_forward = False
        del runner._forward
    assert pending[0] > 0, "no step was built while the one before was in flight"
    for prompt in GREEDY_PROMPTS:
        assert greedy[prompt] == hf_greedy[prompt], prompt
    for a, b in zip(before, after, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs
    assert settled_stats(llm).num_blocks_in_use == 0


def test_greedy_text_is_decoded_tokens(llm, hf_tokenizer):
    out = llm.generate(["The capital of France is"], GREEDY)[0].outputs[0]
    assert out.text == hf_tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.finish_reason in ("stop", "length")


def test_preemption_keeps_greedy_output(hf_greedy):
    """A KV cache of a few blocks forces preemption by recompute; output must not change."""
    small = LLM(dtype="float32", kv_cache_memory=16 * 16 * 2 * 30 * 3 * 64 * 4 / 2**30,
                max_model_len=256, max_num_seqs=8)  # fmt: skip
    try:
        got = token_ids(small.generate(GREEDY_PROMPTS[:8], GREEDY))
        assert small.stats().num_preemptions > 0
        assert settled_stats(small).num_blocks_in_use == 0
    finally:
        small.shutdown()
    for prompt in GREEDY_PROMPTS[:8]:
        assert got[prompt] == hf_greedy[prompt], prompt


def test_chunked_prefill_keeps_greedy_output(hf_greedy):
    """A token budget of 8 splits every prompt into several prefill chunks."""
    chunked = LLM(dtype="float32", kv_cache_memory=0.25, max_model_len=512,
                  max_num_batched_tokens=8)  # fmt: skip
    try:
        got = token_ids(chunked.generate(GREEDY_PROMPTS[:6], GREEDY))
    finally:
        chunked.shutdown()
    for prompt in GREEDY_PROMPTS[:6]:
        assert got[prompt] == hf_greedy[prompt], prompt


def test_grammar_requests_keep_their_output_through_preemption(llm):
    """Each sample has its own matcher; a preempted one replays its tokens into a new one."""
    spec = GrammarSpec(kind="regex", spec=r"(\d\d\d-){5}\d\d\d")
    constrained = SamplingParams(temperature=0.0, max_tokens=48, grammar=spec)
    roomy = [o.outputs[0].text for o in llm.generate(GREEDY_PROMPTS[:8], constrained)]
    small = LLM(dtype="float32", kv_cache_memory=16 * 16 * 2 * 30 * 3 * 64 * 4 / 2**30,
                max_model_len=256, max_num_seqs=8)  # fmt: skip
    try:
        cramped = [o.outputs[0].text for o in small.generate(GREEDY_PROMPTS[:8], constrained)]
        assert small.stats().num_preemptions > 0
        assert settled_stats(small).num_blocks_in_use == 0
        sampled = small.generate(["Digits:"], SamplingParams(n=3, seed=5, max_tokens=48,
                                                             grammar=spec))[0]  # fmt: skip
        with pytest.raises(ValueError, match="Invalid grammar"):
            small.generate(["x"], SamplingParams(grammar=GrammarSpec(kind="regex", spec="(")))
    finally:
        small.shutdown()
    assert cramped == roomy
    for text in roomy + [o.text for o in sampled.outputs]:
        assert re.fullmatch(spec.spec, text), text
