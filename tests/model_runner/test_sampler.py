"""Sampler unit tests on hand-made logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from model_runner.input_batch import SequenceState
from model_runner.sampler import Sampler, token_seed
from model_runner.sampling_ops import (
    apply_min_p,
    draw,
    greedy_argmax,
    sample_top_k_top_p,
    top_k_top_p_candidates,
)
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence

VOCAB = 8
EOS = 7


def make_seq(seq_id="s", prompt=(1, 2), outputs=(), seed=None, **params) -> SequenceState:
    tokens = list(prompt) + list(outputs)
    return SequenceState(
        NewSequence(
            seq_id=seq_id,
            token_ids=tokens,
            num_prompt_tokens=len(prompt),
            num_output_tokens=len(outputs),
            block_ids=[0],
            num_computed_tokens=0,
            sampling=SamplingParams(**params),
            seed=seed,
        )
    )


def sample(seqs, logits, sampler=None):
    sampler = sampler or Sampler(VOCAB, [EOS], seed=0)
    return sampler(logits.clone(), seqs)


def test_greedy_fast_path_takes_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0, 5.0]])
    out = sample([make_seq("a", temperature=0), make_seq("b", top_k=1)], logits)
    assert [(t.seq_id, t.token_id, t.logprob) for t in out] == [("a", 1, None), ("b", 0, None)]


def test_seeded_rows_reproducible_regardless_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB).repeat(4, 1)
    alone = [
        sample([make_seq(f"x{i}", seed=42, outputs=[0] * i)], logits[:1])[0].token_id
        for i in range(20)
    ]
    batched = []
    for i in range(20):
        seqs = [make_seq("n1"), make_seq(f"x{i}", seed=42, outputs=[0] * i), make_seq("n2", seed=7)]
        batched.append(sample(seqs, logits[:3], Sampler(VOCAB, [EOS], seed=i))[1].token_id)
    assert alone == batched
    assert len(set(alone)) > 1  # different output positions draw different noise
    other_seed = [
        sample([make_seq("y", seed=43, outputs=[0] * i)], logits[:1])[0].token_id for i in range(20)
    ]
    assert other_seed != alone


def test_random_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    logits = probs.log().expand(4000, VOCAB).contiguous()
    seqs = [make_seq(str(i)) for i in range(4000)]
    counts = torch.bincount(
        torch.tensor([t.token_id for t in sample(seqs, logits)]), minlength=VOCAB
    )
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3].float() / 4000, probs[:3], atol=0.03)


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0]]).repeat(2000, 1)
    cold = sample([make_seq(str(i), temperature=0.1) for i in range(2000)], logits)
    assert sum(t.token_id == 0 for t in cold) == 2000


def vllm_top_k_top_p_mask(logits, k, p):
    """vLLM's reference rule (sort ascending, mask by k-th value, then by cumulative mass)."""
    ascending, order = logits.sort(dim=-1)
    kth = ascending.gather(1, (logits.shape[-1] - k)[:, None])
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)[:, None]
    drop[:, -1] = False
    ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ascending)


def kept_sets(probs, k, p, width=None):
    weights, ids, enough = top_k_top_p_candidates(probs, k, p, width or probs.shape[-1])
    sets = [set(i[w > 0].tolist()) for w, i in zip(weights, ids, strict=True)]
    return [s if e else None for s, e in zip(sets, enough.tolist(), strict=True)]


def test_top_k_and_top_p_keep_what_vllm_keeps():
    torch.manual_seed(0)
    vocab = 5000
    # Peaked and flat rows: flat ones need the candidate set widened past 256 and 4096.
    scales = torch.tensor([8.0, 4.0, 2.0, 0.5, 0.05, 0.01, 8.0, 0.05])[:, None]
    logits = torch.randn(8, vocab) * scales
    k = torch.tensor([vocab, 50, vocab, 300, vocab, 10, 1, 3000])
    p = torch.tensor([0.9, 0.8, 0.95, 1.0, 0.99, 0.5, 0.3, 0.9])
    expected = vllm_top_k_top_p_mask(logits, k, p)
    expected_sets = [set(torch.nonzero(~torch.isinf(row))[:, 0].tolist()) for row in expected]
    probs = torch.softmax(logits, dim=-1)
    assert kept_sets(probs, k, p) == expected_sets
    narrow = kept_sets(probs, k, p, width=256)  # None: the row does not fit, widen
    fits = [
        kk <= 256 if kk < vocab else len(e) <= 256
        for kk, e in zip(k.tolist(), expected_sets, strict=True)
    ]
    assert [n is not None for n in narrow] == fits
    assert not all(fits)
    assert [n for n in narrow if n is not None] == [
        e for n, e in zip(narrow, expected_sets, strict=True) if n is not None
    ]
    assert len(expected_sets[6]) == 1 and len(expected_sets[4]) > 4096
    for _ in range(20):
        tokens = sample_top_k_top_p(probs, k, p, lambda rows: torch.rand(len(rows))).tolist()
        assert all(t in e for t, e in zip(tokens, expected_sets, strict=True))


@pytest.mark.parametrize("k", [3, 1000])  # k <= SMALL_TOP_K: candidates; else rejection
def test_top_k_top_p_draws_follow_the_truncated_law(k):
    vocab, n = 1000, 6000
    probs = torch.full((vocab,), 0.1 / (vocab - 4))
    probs[:4] = torch.tensor([0.35, 0.25, 0.2, 0.1])
    # top_p 0.75: 0.35 + 0.25 = 0.6 < 0.75 keeps token 2, 0.8 drops token 3 (for k=3,
    # top-p applies to the top-3 mass 0.8: 0.6 >= 0.75 * 0.8 drops token 2 too)
    p = torch.full((n,), 0.75)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_top_k_top_p(
        probs.expand(n, vocab).contiguous(),
        torch.full((n,), k),
        p,
        lambda rows: torch.rand(len(rows), generator=generator),
    )
    freq = torch.bincount(tokens, minlength=vocab).float() / n
    kept = torch.tensor([0.35, 0.25] if k == 3 else [0.35, 0.25, 0.2])
    assert freq[len(kept) :].sum() == 0
    assert freq[: len(kept)].tolist() == pytest.approx((kept / kept.sum()).tolist(), abs=0.02)


def test_top_k_top_p_small_cases():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0]] * 3)
    k = torch.tensor([VOCAB, 2, 3])
    p = torch.tensor([0.65, 1.0, 0.6])
    # p=0.65: 0.4 < 0.65 keeps token 1; top-3 renormalized (0.9): 0.7 >= 0.6*0.9 drops token 2
    assert kept_sets(probs, k, p) == [{0, 1}, {0, 1}, {0, 1}]


def test_min_p_zeroes_unlikely_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08, 0, 0, 0, 0]])
    apply_min_p(probs, torch.tensor([0.2]))  # threshold 0.1
    assert probs[0].tolist() == pytest.approx([0.5, 0.3, 0.12, 0, 0, 0, 0, 0])


def test_draw_follows_weights_and_never_picks_zero_weight():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).repeat(4001, 1)
    uniforms = torch.linspace(0, 1 - 1e-7, 4001)
    picks = draw(weights, uniforms)
    assert set(picks.tolist()) == {1, 3}
    assert (picks == 1).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert draw(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([0.9999999])).item() == 1


def test_top_k_top_p_min_p_through_sampler_never_leave_the_kept_set():
    logits = torch.tensor([[3.0, 2.9, 2.8, 1.0, 0.5, 0.1, 0.0, -1.0]]).repeat(300, 1)
    seqs = [make_seq(str(i), top_k=3) for i in range(100)]
    seqs += [make_seq(str(i), top_p=0.5) for i in range(100, 200)]
    seqs += [make_seq(str(i), min_p=0.9) for i in range(200, 300)]
    tokens = [t.token_id for t in sample(seqs, logits)]
    assert set(tokens[:100]) == {0, 1, 2}
    assert set(tokens[100:200]) <= {0, 1}
    assert set(tokens[200:]) <= {0, 1, 2}


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, 2.0, -1.0, 1.9, 0, 0, 0, -5.0]])
    seq = make_seq(prompt=(0,), outputs=(2,), temperature=0, repetition_penalty=2.0)
    sampler = Sampler(VOCAB, [EOS])
    processed = logits.clone()
    sampler._apply_penalties(processed, [seq])
    assert processed[0, :4].tolist() == pytest.approx([1.0, 2.0, -2.0, 1.9])
    assert sample([seq], logits)[0].token_id == 1


def test_frequency_and_presence_penalties_count_outputs_only():
    logits = torch.zeros(1, VOCAB)
    seq = make_seq(
        prompt=(5, 5), outputs=(1, 1, 1, 2), frequency_penalty=0.5, presence_penalty=0.25
    )
    Sampler(VOCAB, [EOS])._apply_penalties(logits, [seq])
    assert logits[0].tolist() == [0, -1.75, -0.75, 0, 0, 0, 0, 0]


def test_logit_bias():
    logits = torch.zeros(2, VOCAB)
    seqs = [
        make_seq("a", temperature=0, logit_bias={3: 5.0}),
        make_seq("b", temperature=0, logit_bias={6: 1.0, 99: 9.0}),
    ]
    assert [t.token_id for t in sample(seqs, logits)] == [3, 6]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_tokens(ignore_eos):
    logits = torch.tensor([[0, 0, 0, 0, 0, 8.0, 9.0, 10.0]])
    params = dict(temperature=0, min_tokens=2, stop_token_ids=[6], ignore_eos=ignore_eos)
    early = sample([make_seq(outputs=(1,), **params)], logits)[0].token_id
    assert early == (7 if ignore_eos else 5)
    assert sample([make_seq(outputs=(1, 1), **params)], logits)[0].token_id == 7


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    seqs = [
        make_seq("a", temperature=0.7, logprobs=3, repetition_penalty=1.5),
        make_seq("b", temperature=0),
    ]
    out = sample(seqs, logits)
    expected = torch.log_softmax(logits[0], dim=-1)
    assert out[0].logprob == pytest.approx(expected[out[0].token_id].item(), abs=1e-6)
    top = torch.topk(expected, 3)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out[1].logprob is None and out[1].top_logprobs is None
    zero = sample([make_seq(temperature=0, logprobs=0)], logits[:1])[0]
    assert zero.top_logprobs == [] and math.isclose(
        zero.logprob, expected.max().item(), abs_tol=1e-6
    )


def test_token_seed_is_mixed_and_positive():
    seeds = {token_seed(s, i) for s in range(10) for i in range(10)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


def test_penalty_counts_follow_appended_tokens():
    seq = make_seq(prompt=(4,), outputs=(1,), frequency_penalty=1.0, repetition_penalty=2.0)
    sampler = Sampler(VOCAB, [EOS])
    sampler._apply_penalties(torch.zeros(1, VOCAB), [seq])  # builds the counts
    seq.append(3)
    seq.append(3)
    logits = torch.ones(1, VOCAB)
    sampler._apply_penalties(logits, [seq])
    # repetition halves tokens 1, 3, 4 (to 0.5); frequency subtracts 1x / 2x their counts
    assert logits[0].tolist() == [1, -0.5, 1, -1.5, 0.5, 1, 1, 1]


@pytest.mark.parametrize("vocab", [100, 2048, 3000, 49152])
def test_greedy_argmax_equals_argmax_with_ties_and_tails(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=gen)
    top = logits.max() + 1
    logits[0, [5, vocab - 1]] = top  # tie between the first block and the tail: first wins
    logits[1, vocab - 1] = top  # the tail alone
    logits[2, [vocab // 2, vocab // 2 + 1]] = top  # tie inside one block
    logits[3] = 0.0  # all equal: index 0
    logits[4, -(vocab % 1024 or 1) :] = -1e9  # a tail far below
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    assert greedy_argmax(logits)[0].item() == 5
