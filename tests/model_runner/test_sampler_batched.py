"""The batched sampler against per-row references, for random parameter mixes.

A row's draws come from its own counter-based keys, so the batch must give every row what
sampling it alone gives; and each result must be what a naive per-row reference allows.
"""

from __future__ import annotations

import random

import pytest
import torch

from model_runner.counter_rng import RowUniforms, signed_seed, token_keys, token_seed, uniforms
from model_runner.sampler import Sampler
from tests.model_runner.test_sampler import make_seq, vllm_top_k_top_p_mask

VOCAB = 300  # past SMALL_TOP_K (256): both top-k paths run
EOS = 299


def test_device_keys_equal_the_host_token_seed():
    rng = random.Random(0)
    seeds = [rng.getrandbits(64) for _ in range(64)] + [0, 1, 2**63, 2**64 - 1]
    indices = [rng.getrandbits(24) for _ in seeds]
    keys = token_keys(torch.tensor([signed_seed(s) for s in seeds]), torch.tensor(indices))
    assert keys.tolist() == [token_seed(s, i) for s, i in zip(seeds, indices, strict=True)]


def test_uniforms_are_uniform_and_each_row_counts_its_own_draws():
    u = uniforms(torch.arange(200_000), torch.zeros(200_000, dtype=torch.long))
    assert 0 <= u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    keys = torch.tensor([5, 6, 7])
    a, b = RowUniforms(keys), RowUniforms(keys)
    first = a()
    assert torch.equal(b([1]), first[1:2])  # row 1's first draw, whatever else draws
    assert torch.equal(b([0, 2]), first[[0, 2]])
    assert not torch.equal(a(), first)  # the next call draws fresh numbers


def random_seq(rng: random.Random, row: int):
    """A sequence with a random mix of every sampling parameter (always seeded)."""
    params = dict(
        temperature=rng.choice([0.0, 0.0, 0.6, 1.0, 1.4]),
        top_k=rng.choice([0, 0, 1, 5, 40, 280]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.3]),
        logprobs=rng.choice([None, None, 0, 3]),
        min_tokens=rng.choice([0, 0, 3]),
    )
    if rng.random() < 0.3:
        params["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(3)}
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
    outputs = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))]
    return make_seq(f"r{row}", prompt, outputs, seed=rng.getrandbits(64), **params)


def reference_logits(logits: torch.Tensor, seq) -> torch.Tensor:
    """Row processing written per token: min_tokens, logit_bias, penalties (vLLM's rules)."""
    out = logits.clone()
    p = seq.sampling
    if seq.num_output_tokens < p.min_tokens:
        out[EOS] = float("-inf")
    for token, value in (p.logit_bias or {}).items():
        out[token] += value
    prompt = seq.token_ids[: seq.num_prompt_tokens]
    outputs = seq.token_ids[seq.num_prompt_tokens :]
    for token in range(VOCAB):
        if token in prompt or token in outputs:
            v = out[token]
            out[token] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        count = outputs.count(token)
        if count:
            out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def reference_kept(logits: torch.Tensor, seq) -> set[int]:
    """The tokens a random row may draw: temperature, min_p, then vLLM's top-k/top-p."""
    p = seq.sampling
    probs = torch.softmax(logits / p.temperature, dim=-1)
    probs[probs < probs.max() * p.min_p] = 0
    k = torch.tensor([p.top_k if p.top_k > 0 else VOCAB])
    masked = vllm_top_k_top_p_mask(probs.log()[None], k, torch.tensor([p.top_p]))[0]
    return set(torch.nonzero(masked > float("-inf"))[:, 0].tolist())


@pytest.mark.parametrize("trial", range(6))
def test_batched_sampling_equals_per_row_references(trial):
    rng = random.Random(trial)
    torch.manual_seed(trial)
    rows = 24
    seqs = [random_seq(rng, i) for i in range(rows)]
    logits = (
        torch.randn(rows, VOCAB)
        * torch.tensor([rng.choice([0.3, 2.0, 6.0]) for _ in seqs])[:, None]
    )
    batched = Sampler(VOCAB, [EOS], seed=trial)(logits.clone(), seqs)
    for i, seq in enumerate(seqs):
        alone = Sampler(VOCAB, [EOS], seed=99)(logits[i : i + 1].clone(), [seq])[0]
        assert batched[i] == alone, f"row {i}: {seq.sampling}"
        processed = reference_logits(logits[i], seq)
        token = batched[i].token_id
        if seq.sampling.greedy:
            assert token == int(processed.argmax())
        else:
            assert token in reference_kept(processed, seq)
        want = seq.sampling.logprobs
        if want is None:
            assert batched[i].logprob is None
            continue
        raw = torch.log_softmax(logits[i], dim=-1)
        assert batched[i].logprob == pytest.approx(raw[token].item(), abs=1e-5)
        top = raw.topk(want)
        assert [t for t, _ in batched[i].top_logprobs] == top.indices.tolist()


def test_seeded_draws_follow_the_distribution_across_output_positions():
    """Counter-based draws of one seeded request over its outputs follow its law."""
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (VOCAB - 3))
    logits = probs.log()[None].expand(3000, VOCAB).contiguous()
    seqs = [make_seq(f"s{i}", outputs=[0] * i, seed=1234) for i in range(3000)]
    tokens = [t.token_id for t in Sampler(VOCAB, [EOS])(logits, seqs)]
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 3000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
