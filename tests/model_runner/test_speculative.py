"""Verifying proposals: the longest run the samples confirm, plus the sample after it."""

from __future__ import annotations

import torch

from model_runner.speculative import DraftPosition, SpecBatch, SpecGroup


def test_verify_keeps_the_confirmed_run_and_the_sample_after_it():
    # rows: a plain row, then a group proposing [5, 6, 7], then one proposing [9]
    tokens = torch.tensor([42, 5, 6, 8, 3, 1, 4])  # the samples of every position
    spec = SpecBatch([SpecGroup(1, None, [5, 6, 7]), SpecGroup(5, None, [9])])
    accepted = spec.verify(tokens).tolist()
    assert accepted == [2, 0]  # 5 and 6 confirmed, 8 != 7; 1 != 9
    keep = spec.kept_rows(7, accepted)
    assert [t for t, k in zip(tokens.tolist(), keep, strict=True) if k] == [42, 5, 6, 8, 1]


def test_all_confirmed_keeps_the_bonus_token():
    spec = SpecBatch([SpecGroup(0, None, [5, 6])])
    accepted = spec.verify(torch.tensor([5, 6, 11])).tolist()
    assert accepted == [2] and spec.kept_rows(3, accepted) == [True, True, True]


def test_a_draft_position_counts_the_proposals_before_it():
    class State:
        seq_id, num_output_tokens, seed, grammar = "s", 4, 7, None

        def penalty_state(self):
            return frozenset({1}), {5: 1}

    row = DraftPosition(State(), [5, 9])
    assert (row.seq_id, row.num_output_tokens, row.seed, row.grammar) == ("s", 6, 7, None)
    assert row.penalty_state() == (frozenset({1}), {5: 2, 9: 1})
    assert DraftPosition(State(), []).penalty_state() == (frozenset({1}), {5: 1})
