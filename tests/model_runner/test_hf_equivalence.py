"""Greedy output of ModelRunner equals HF transformers' generate on the same GGUF weights.

This also verifies the GGUF q/k un-permutation: without it, not one prompt would match.
"""

from __future__ import annotations

import pytest
import torch

from kernels.linear import packing_available
from model_runner.sampling_params import SamplingParams
from tests.model_runner.driver import GREEDY, Driver, DriverSeq, generate


def _assert_all_equal(outputs, cases):
    mismatches = [
        i for i, (out, (_, ref)) in enumerate(zip(outputs, cases, strict=True)) if out != ref
    ]
    assert not mismatches, f"prompts {mismatches} differ from HF"


def test_reference_cases_are_varied(reference_cases):
    assert len(reference_cases) >= 10
    lengths = [len(ids) for ids, _ in reference_cases]
    assert min(lengths) < 10 and max(lengths) > 40  # plain and chat-templated prompts
    assert sum(len(ref) == 32 for _, ref in reference_cases) >= 8


@pytest.mark.parametrize("placeholders", [True, False], ids=["overlap", "sync"])
def test_greedy_batched_matches_hf(runner, reference_cases, placeholders):
    outputs = generate(runner, [ids for ids, _ in reference_cases], placeholders=placeholders)
    _assert_all_equal(outputs, reference_cases)


def test_greedy_alone_matches_hf(runner, reference_cases):
    cases = reference_cases[::2]  # plain and chat-templated; a step per token is slow alone
    outputs = [generate(runner, [ids])[0] for ids, _ in cases]
    _assert_all_equal(outputs, cases)


def test_greedy_at_the_packed_gemm_batch_matches_hf(runner, reference_cases):
    # 32 sequences: decode steps of 17-32 rows run the MKL-packed weights (padded below 32).
    assert runner.config.cpu_packed_batch == 32
    qkv = runner.model.layers[0].qkv_proj.method
    assert (qkv.packed is not None) == packing_available(torch.float32)
    cases = (reference_cases * 4)[:32]
    outputs = generate(runner, [ids for ids, _ in cases])
    _assert_all_equal(outputs, cases)
    assert runner.paths.decode_context.rows == 32  # and the decodes attended over its copy


def test_chunked_prefill_mixed_with_decodes_matches_hf(runner, reference_cases):
    # 7-token prefill chunks under a 24-token budget: steps mix decodes with prefill chunks.
    outputs = generate(runner, [ids for ids, _ in reference_cases], chunk_size=7, token_budget=24)
    _assert_all_equal(outputs, reference_cases)


def test_fork_with_block_copy_matches_hf(runner, reference_cases):
    # Fork each sequence mid-decode: the child shares full blocks and gets a copy of the
    # partial last block (block_copies); both must continue exactly like HF.
    cases = [c for c in reference_cases if len(c[1]) == 32][:4]
    driver = Driver(runner)
    parents = [DriverSeq(f"p{i}", list(ids), GREEDY) for i, (ids, _) in enumerate(cases)]
    while min(len(p.tokens) for p in parents) < 5:
        driver.step(parents)
    children = [driver.fork(p, f"c{i}") for i, p in enumerate(parents)]
    assert driver.pending_copies, "the fork point should fall inside a block"
    driver.run(parents + children)
    for (_, ref), parent, child in zip(cases, parents, children, strict=True):
        assert parent.tokens == ref
        assert child.tokens == ref


def test_bfloat16_mostly_matches_float32(runner_bf16, reference_cases):
    outputs = generate(runner_bf16, [ids for ids, _ in reference_cases])
    same_start = sum(
        out[:4] == ref[:4] for out, (_, ref) in zip(outputs, reference_cases, strict=False)
    )
    assert same_start >= 0.7 * len(reference_cases), f"only {same_start} start like fp32"
    assert all(len(out) > 0 for out in outputs)
    same_tokens = sum(
        a == b
        for out, (_, ref) in zip(outputs, reference_cases, strict=False)
        for a, b in zip(out, ref, strict=False)
    )
    assert same_tokens >= 0.4 * sum(len(ref) for _, ref in reference_cases)


def test_logprobs_of_greedy_tokens_are_the_top_ones(runner, reference_cases):
    ids, ref = reference_cases[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    seq = DriverSeq("lp", list(ids), params)
    Driver(runner).run([seq])
    assert seq.tokens == ref[:8]
    for sampled in seq.outputs:
        top_ids = [t for t, _ in sampled.top_logprobs]
        top_lps = [lp for _, lp in sampled.top_logprobs]
        assert len(top_ids) == 3 and top_ids[0] == sampled.token_id
        assert top_lps == sorted(top_lps, reverse=True)
        assert abs(sampled.logprob - top_lps[0]) < 1e-6 and sampled.logprob <= 0
