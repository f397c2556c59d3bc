"""The rejection rule for a draft model's sampled proposals, against the exact target law."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from model_runner.rejection_sampler import processed_probs, rejection_sample
from model_runner.sampling_ops import draw

ROWS, VOCAB = 200_000, 6


def _random_probs(generator: torch.Generator, *shape: int) -> torch.Tensor:
    logits = torch.randn(*shape, VOCAB, generator=generator) * 1.5
    return torch.softmax(logits, dim=-1)


def test_kept_tokens_follow_the_target_distribution_whatever_the_draft():
    """Two positions with fixed p and q: the first kept token is distributed as p_0, and the
    second (where the first proposal was accepted) as p_1; accepts happen at rate
    sum(min(p, q)). TV bound: 0.01 (sampling noise at 200k rows is about 0.003)."""
    gen = torch.Generator().manual_seed(0)
    p = _random_probs(gen, 3)  # positions 0, 1 and the bonus position
    q = _random_probs(gen, 2)
    drafts = torch.stack([draw(q[j].expand(ROWS, VOCAB), torch.rand(ROWS, generator=gen))
                          for j in range(2)], dim=1)  # fmt: skip
    bonus = draw(p[2].expand(ROWS, VOCAB), torch.rand(ROWS, generator=gen))
    tokens, accepted = rejection_sample(
        p.expand(ROWS, 3, VOCAB),
        q.expand(ROWS, 2, VOCAB),
        drafts,
        torch.full((ROWS,), 2),
        bonus,
        torch.rand(ROWS, 2, generator=gen),
        torch.rand(ROWS, 2, generator=gen),
    )

    def law(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(values, minlength=VOCAB).float() / len(values)

    tv = 0.5 * (law(tokens[:, 0]) - p[0]).abs().sum()
    assert tv < 0.01, tv
    second = tokens[accepted >= 1, 1]
    assert 0.5 * (law(second) - p[1]).abs().sum() < 0.01
    rate = (accepted >= 1).float().mean()
    assert abs(rate - torch.minimum(p[0], q[0]).sum()) < 0.01
    assert torch.equal(tokens[:, 0][accepted >= 1], drafts[:, 0][accepted >= 1])
    all_kept = accepted == 2
    assert torch.equal(tokens[all_kept, 2], bonus[all_kept])
    # a rejected proposal is never the replacement: verify counts what the rule accepted
    rejected = accepted == 0
    assert not bool((tokens[rejected, 0] == drafts[rejected, 0]).any())


def test_padding_past_a_rows_proposals_is_never_accepted():
    p = torch.full((1, 3, VOCAB), 1.0 / VOCAB)
    q = p[:, :2].clone()
    tokens, accepted = rejection_sample(
        p, q, torch.tensor([[1, 2]]), torch.tensor([1]), torch.tensor([5]),
        torch.zeros(1, 2), torch.zeros(1, 2),
    )  # fmt: skip
    assert accepted.tolist() == [1] and tokens[0, :2].tolist() == [1, 5]


def test_processed_probs_apply_min_p_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    meta = SimpleNamespace(top_k=torch.tensor([2, 4, 4]), top_p=torch.tensor([1.0, 0.7, 1.0]),
                           min_p=torch.tensor([0.0, 0.0, 0.2]), any_min_p=True,
                           any_truncation=True)  # fmt: skip
    probs = processed_probs(logits, meta)
    want = torch.tensor([[5 / 8, 3 / 8, 0, 0], [5 / 8, 3 / 8, 0, 0], [0.5 / 0.95, 0.3 / 0.95,
                         0.15 / 0.95, 0]])  # fmt: skip
    assert torch.allclose(probs, want, atol=1e-6)
