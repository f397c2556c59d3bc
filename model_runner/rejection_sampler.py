"""A draft model's proposals accepted by the standard rejection rule, on the device.

Proposal x_j was drawn from the draft's distribution q_j; the target's distribution at the
same position is p_j (both after temperature, min_p, top-k and top-p; p also after the
grammar mask, min_tokens, logit_bias and penalties). x_j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); the first rejected position draws its token from
normalize(max(p_j - q_j, 0)) instead, and when all are accepted the row's bonus token is the
target's own sample after them. Every kept token is then distributed exactly as plain
sampling from p (Leviathan et al., 2023; Chen et al., 2023).

Greedy rows need none of it: their proposals are the draft's argmax and are kept while they
equal the target's (model_runner/speculative.py), as are n-gram proposals (q one-hot).
Uniforms come from the rows' counter-RNG keys (`counter_rng`) with draw indices of their
own, so a seeded request draws the same tokens on every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from model_runner.counter_rng import uniforms
from model_runner.sampling_metadata import SamplingMetadata
from model_runner.sampling_ops import apply_min_p, draw, top_k_top_p_candidates
from model_runner.step_upload import to_device

# NOTE: draw indices past any the sampler takes (it counts 0, 1, ... per row and step)
DRAFT_DRAW = 1 << 20  # the draft's own draw of a proposal
ACCEPT_DRAW = DRAFT_DRAW + 1  # the accept test of the proposal after a position
RESIDUAL_DRAW = DRAFT_DRAW + 2  # the replacement draw where it is rejected


def processed_probs(scaled_logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[R, V] normalised distributions the sampler draws from: softmax of logits already
    divided by the temperature, then min_p, then vLLM's top-k and top-p (`meta`: of these
    rows; its host flags say which stages apply, so no device value is read)."""
    probs = torch.softmax(scaled_logits, dim=-1)
    if meta.any_min_p:
        apply_min_p(probs, meta.min_p)
    if meta.any_truncation:
        weights, ids, _ = top_k_top_p_candidates(probs, meta.top_k, meta.top_p, probs.shape[-1])
        probs = torch.zeros_like(probs).scatter_(1, ids, weights)
    return probs / probs.sum(dim=-1, keepdim=True)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    bonus: torch.Tensor,
    accept_uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on G rows of up to K proposals: (tokens [G, K + 1], accepted [G]).

    target_probs [G, K + 1, V]; draft_probs [G, K, V]; drafts [G, K] (padding past
    num_drafts [G] is never accepted); bonus [G]: the target's sample after the last
    proposal; uniforms [G, K] in [0, 1). tokens[g, :accepted[g]] are the accepted proposals
    and tokens[g, accepted[g]] the replacement or the bonus; later positions are undefined.
    """
    g, k, vocab = draft_probs.shape
    p = target_probs[:, :k]
    p_x = p.gather(2, drafts[..., None])[..., 0]
    q_x = draft_probs.gather(2, drafts[..., None])[..., 0]
    valid = torch.arange(k, device=drafts.device)[None, :] < num_drafts[:, None]
    # NOTE: u * q < p accepts with probability min(1, p / q); q(x) > 0 as x was drawn from q
    accept = (accept_uniforms * q_x < p_x) & valid
    accepted = accept.to(torch.int32).cumprod(dim=1).sum(dim=1)
    residual = (p - draft_probs).clamp_(min=0).reshape(g * k, vocab)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: never rejected; any row works
    residual = torch.where(empty, p.reshape(g * k, vocab), residual)
    replaced = draw(residual, residual_uniforms.reshape(-1)).view(g, k)
    j = torch.arange(k, device=drafts.device)[None, :]
    tokens = torch.where(j < accepted[:, None], drafts, replaced)
    tokens = torch.cat([tokens, torch.zeros_like(bonus)[:, None]], dim=1)
    rows = torch.arange(g, device=drafts.device)
    tokens[rows, accepted.long()] = torch.where(
        accepted.long() == num_drafts, bonus, tokens[rows, accepted.long()]
    )
    return tokens, accepted


@dataclass(frozen=True, slots=True)
class DraftGroup:
    """A sampling (not greedy) speculating row: its K + 1 sampling rows from `first_row`."""

    first_row: int
    drafts: list[int]


@dataclass(frozen=True, slots=True)
class DraftRejection:
    """The step's sampled speculating rows and their draft distributions [G, K, V]."""

    groups: list[DraftGroup]
    draft_probs: torch.Tensor

    def apply(
        self, scaled_logits: torch.Tensor, tokens: torch.Tensor, meta: SamplingMetadata
    ) -> torch.Tensor:
        """The step's tokens [R] with each group's rows replaced by the rule's tokens
        (scaled_logits: the sampler's logits after every mask, divided by the temperature)."""
        k = self.draft_probs.shape[1]
        device = tokens.device
        index = [[grp.first_row + min(j, len(grp.drafts)) for j in range(k + 1)]
                 for grp in self.groups]  # fmt: skip
        rows = to_device(index, torch.long, device)
        flat = rows.reshape(-1)
        of_rows = dataclasses.replace(
            meta, top_k=meta.top_k[flat], top_p=meta.top_p[flat], min_p=meta.min_p[flat]
        )  # NOTE: the batch's host flags still hold (a stage that is off changes nothing)
        p = processed_probs(scaled_logits[flat], of_rows)
        p = p.view(len(self.groups), k + 1, -1)
        drafts = to_device([grp.drafts + [0] * (k - len(grp.drafts)) for grp in self.groups],
                           torch.long, device)  # fmt: skip
        num_drafts = to_device([len(grp.drafts) for grp in self.groups], torch.long, device)
        row_keys = meta.keys[rows[:, :k]]
        out, _ = rejection_sample(
            p,
            self.draft_probs,
            drafts,
            num_drafts,
            tokens[rows.gather(1, num_drafts[:, None])[:, 0]],
            uniforms(row_keys, torch.full_like(row_keys, ACCEPT_DRAW)),
            uniforms(row_keys, torch.full_like(row_keys, RESIDUAL_DRAW)),
        )
        tokens = tokens.clone()
        written = [(g, j) for g, grp in enumerate(self.groups) for j in range(len(grp.drafts) + 1)]
        gi = to_device([g for g, _ in written], torch.long, device)
        ji = to_device([j for _, j in written], torch.long, device)
        tokens[rows[gi, ji]] = out[gi, ji]
        return tokens
