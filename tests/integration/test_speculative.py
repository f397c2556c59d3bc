"""Speculative decoding (n-gram proposals) through the whole engine, float32 on the CPU:
output as without speculation, blocks all returned, proposals actually accepted."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from api import LLM, SamplingParams
from model_runner.fused_decode import FusedDecode
from model_runner.model_source import default_gguf_path
from model_runner.sampling_params import GrammarSpec
from tests.conftest import GREEDY_PROMPTS, needs_int8_dot, settled_stats

CODE = """def total(items):
    result = 0
    for item in items:
        result = result + item.price * item.count
    return result
"""
REPETITIVE = [
    "Rewrite this function, renaming `total` to `order_total` and changing nothing else:\n\n"
    + CODE
    + "\nHere it is:\n\ndef order_total(items):\n",
    "Quote the passage back word for word. Passage: The river runs past the old mill, under "
    "the stone bridge and into the lake, where the boats wait for summer. Quote: The river",
    "apple, banana, cherry, date, apple, banana, cherry, date, apple, banana,",
]
PROMPTS = GREEDY_PROMPTS[:4] + REPETITIVE
TOKENS = 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=TOKENS)
GREEDY_MARGINS = SamplingParams(temperature=0.0, max_tokens=TOKENS, logprobs=2)
MARGIN = 1e-3


def ngram(k: int) -> dict:
    # NOTE: no batch-size cut-off: these tests speculate among up to 16 rows
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2, "disable_by_batch_size": None}  # fmt: skip


def engine(**kw) -> LLM:
    return LLM(dtype="float32", kv_cache_memory=0.25, max_model_len=1024, use_tqdm=False, **kw)


@pytest.fixture(scope="module")
def plain():
    llm = engine()
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(plain):
    """prompt -> (token ids, top-2 margin at each position) without speculation."""
    out = {}
    for o in plain.generate(PROMPTS, GREEDY_MARGINS):
        c = o.outputs[0]
        margins = []
        for entry in c.logprobs:
            top = sorted((lp for _, _, lp in entry.top), reverse=True)
            margins.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        out[o.prompt] = (c.token_ids, margins)
    return out


def assert_same_greedy(reference, got: dict[str, list[int]]) -> None:
    """Identical tokens up to where the reference's top-2 margin is under MARGIN (scoring
    K + 1 positions at once is another numeric path than a one-token decode)."""
    for prompt, (ref, margins) in reference.items():
        ids = got[prompt]
        for i, (a, b) in enumerate(zip(ref, ids, strict=False)):
            if a != b:
                assert margins[i] < MARGIN, (prompt, i, margins[i])
                break
        else:
            assert len(ids) == len(ref), prompt


def token_ids(outputs) -> dict[str, list[int]]:
    return {o.prompt: o.outputs[0].token_ids for o in outputs}


@pytest.fixture(scope="module")
def spec2():
    llm = engine(speculative_config=ngram(2))
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def spec4():
    llm = engine(speculative_config=ngram(4))
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_output_is_unchanged_and_proposals_are_accepted(reference, k, request):
    llm = request.getfixturevalue(f"spec{k}")
    before = settled_stats(llm).spec
    together = token_ids(llm.generate(PROMPTS, GREEDY))
    alone = token_ids(llm.generate(REPETITIVE[:1], GREEDY))
    stats = settled_stats(llm)
    assert stats.num_blocks_in_use == 0
    (scheduler,) = [a for a in llm.engine.local_actors if a.name == "scheduler"]
    scheduler.policy.blocks.check_invariants()  # consistent after rejected proposals
    spec = spec_since(before, stats.spec)
    assert_same_greedy(reference, together)
    assert_same_greedy({p: reference[p] for p in REPETITIVE[:1]}, alone)
    assert spec.num_drafts > 0 and spec.num_draft_tokens >= spec.num_accepted_tokens > 0
    assert len(spec.accepted_per_pos) == k and spec.accepted_per_pos[0] > 0
    # the repetitive prompts are what speculation is for: most proposals hold there
    assert spec.num_accepted_tokens / spec.num_draft_tokens > 0.3


def spec_since(before, after):
    """The counters of what ran between two settled stats."""
    return type(after)(
        num_drafts=after.num_drafts - before.num_drafts,
        num_draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens=after.num_accepted_tokens - before.num_accepted_tokens,
        accepted_per_pos=[a - b for a, b in zip(after.accepted_per_pos, before.accepted_per_pos,
                                                strict=True)],
    )  # fmt: skip


def test_the_model_as_its_own_draft_keeps_greedy_output_and_nearly_every_proposal(plain, reference):
    """The default model drafts for itself (loaded twice): the draft's one-token steps and
    the target's K + 1 positions differ only in rounding, so >= 99% of proposals hold.
    A grammar's bitmask checks the proposals too (greedy: the plain output; sampled: text
    that matches)."""
    draft = {"method": "draft_model", "model": str(default_gguf_path()),
             "num_speculative_tokens": 3}  # fmt: skip
    prompts, n = GREEDY_PROMPTS[:2] + REPETITIVE[:2], TOKENS // 2  # NOTE: 4 passes a step
    fruit = GrammarSpec(kind="regex", spec=r"( (apple|banana|cherry|date),)+")
    constrained = [
        SamplingParams(temperature=0.0, max_tokens=n, grammar=fruit),
        SamplingParams(temperature=0.8, seed=1, max_tokens=n, grammar=fruit),
    ]
    want = plain.generate(REPETITIVE[2:], constrained[0])[0].outputs[0].token_ids
    llm = engine(speculative_config=draft)
    try:
        got = token_ids(llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n)))
        stats = settled_stats(llm)
        grammar = [o.outputs[0] for o in llm.generate(REPETITIVE[2:] * 2, constrained)]
    finally:
        llm.shutdown()
    assert_same_greedy({p: (reference[p][0][:n], reference[p][1][:n]) for p in prompts}, got)
    assert stats.num_blocks_in_use == 0
    assert stats.spec.num_accepted_tokens >= 0.99 * stats.spec.num_draft_tokens > 0
    assert grammar[0].token_ids == want
    assert re.fullmatch(r"( (apple|banana|cherry|date),)*( (apple|banana|cherry|date),?)?",
                        grammar[1].text), grammar[1].text  # fmt: skip


def test_seeded_samples_are_the_ones_without_speculation(plain, spec2):
    """A seeded row draws each position with its output index's key, so speculation cannot
    change its tokens; over many seeds the joint law of the first 3 tokens is the same."""
    prompt = REPETITIVE[2]
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=s, max_tokens=6, logprobs=1)
              for s in range(48)]  # fmt: skip
    without = [o.outputs[0] for o in plain.generate([prompt] * 48, params)]
    before = settled_stats(spec2).spec
    with_spec = [o.outputs[0] for o in spec2.generate([prompt] * 48, params)]
    stats = settled_stats(spec2)
    assert stats.num_blocks_in_use == 0
    assert spec_since(before, stats.spec).num_accepted_tokens > 0
    first3 = [Counter(tuple(c.token_ids[:3]) for c in run) for run in (without, with_spec)]
    tv = 0.5 * sum(abs(first3[0][k] - first3[1][k]) for k in first3[0] | first3[1]) / 48
    assert tv <= 0.05
    for a, b in zip(without, with_spec, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.token_id == lb.token_id and [t for t, _, _ in la.top] == [
                t for t, _, _ in lb.top
            ]
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_penalties_min_tokens_and_grammars_sample_as_without_speculation(plain, spec4):
    """Each position's penalties, min_tokens mask and grammar bitmask follow the proposals
    before it: greedy and seeded outputs are the plain ones."""
    prompt = REPETITIVE[2]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.1),
        SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24),
        SamplingParams(temperature=0.8, seed=3, max_tokens=24, presence_penalty=0.2),
        SamplingParams(temperature=0.0, max_tokens=30,
                       grammar=GrammarSpec(kind="regex", spec=r"( (apple|banana|cherry|date),)+")),
    ]  # fmt: skip
    want = [o.outputs[0].token_ids for o in plain.generate([prompt] * len(cases), cases)]
    before = settled_stats(spec4).spec
    got = [o.outputs[0].token_ids for o in spec4.generate([prompt] * len(cases), cases)]
    assert spec_since(before, settled_stats(spec4).spec).num_accepted_tokens > 0
    assert got == want


def test_stop_strings_and_preemption_under_speculation(plain):
    """A stop string inside an accepted run cuts where it does without speculation; a KV
    cache of a few blocks preempts speculating rows and output still holds."""
    prompt = REPETITIVE[0]
    full = plain.generate([prompt], GREEDY)[0].outputs[0].text
    stop = SamplingParams(temperature=0.0, max_tokens=TOKENS, stop=[full[25:33]])
    want = plain.generate([prompt], stop)[0].outputs[0]
    tiny = LLM(dtype="float32", kv_cache_memory=16 * 16 * 2 * 30 * 3 * 64 * 4 / 2**30,
               max_model_len=256, max_num_seqs=8, use_tqdm=False,
               speculative_config=ngram(4))  # fmt: skip
    try:
        got = tiny.generate([prompt], stop)[0].outputs[0]
        crowd = token_ids(tiny.generate(REPETITIVE * 3, GREEDY))
        stats = settled_stats(tiny)
    finally:
        tiny.shutdown()
    assert got.text == want.text == full[:25] and got.finish_reason == want.finish_reason == "stop"
    assert stats.num_preemptions > 0 and stats.num_blocks_in_use == 0
    assert stats.spec.num_accepted_tokens > 0
    base = token_ids(plain.generate(REPETITIVE, GREEDY))
    for prompt in REPETITIVE:
        assert crowd[prompt] == base[prompt], prompt


@needs_int8_dot
def test_the_fused_cpu_layer_verifies_with_plain_decodings_tokens():
    """The default CPU mode (bf16, int8-dot weights): speculating rows verify in the fused
    C++ layer, a row per token (every row computed on its own: the same logits as one-token
    decoding), alone and batched within the layer's rows.

    NOTE: no dense weight copy (`cpu_int4_max_rows=-1`): prefill chunks of more than the
    crossover's rows would take the bf16 copy, whose sums depend on the chunk's rows, and
    which prompts share a prefill step depends on when they arrive (and on prefix-cache
    hits), in either run. Every GEMM is then the int8-dot kernel, a row's result the same
    whatever the step."""
    prompts = REPETITIVE + GREEDY_PROMPTS[:2]
    want = {}
    for name, kw in (("plain", {}), ("spec", {"speculative_config": ngram(4)})):
        llm = LLM(kv_cache_memory=0.25, max_model_len=1024, use_tqdm=False,
                  cpu_int4_max_rows=-1, **kw)  # fmt: skip
        try:
            alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
            batched = list(token_ids(llm.generate(prompts, GREEDY)).values())
            (executor,) = [a for a in llm.engine.local_actors if a.name == "executor"]
            fused = executor.runner.paths.compiled
            stats = settled_stats(llm)
        finally:
            llm.shutdown()
        assert isinstance(fused, FusedDecode)
        want[name] = (alone, batched)
    assert fused.verify_steps > 0 and stats.spec.num_accepted_tokens > 0
    assert stats.num_blocks_in_use == 0
    assert want["spec"] == want["plain"]
