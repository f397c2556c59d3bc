"""Overlapped scheduling: placeholders, tokens learnt one step late, rows that step
synchronously, discarded over-generated tokens, exact block accounting, faults, aborts."""

from __future__ import annotations

import random
import zlib

import pytest

from actors.protocol import SeqOutput
from model_runner.sampling_params import GrammarSpec
from model_runner.step_input import SampledToken, StepOutput
from tests.scheduler.fake_runner import (
    Driver,
    FakeRunner,
    OverlapDriver,
    make_scheduler,
    request,
)


def chunks(step):
    return [
        (c.seq_id, c.num_tokens, c.block_table_start, c.block_ids, c.num_placeholders)
        for c in step.chunks
    ]


def out(step, *sampled):
    return StepOutput(step_id=step.step_id, sampled=[SampledToken(s, t) for s, t in sampled])


def test_placeholder_row_is_planned_while_the_step_runs():
    sched = make_scheduler(block_size=4)
    sched.add_request(request("a", [1, 2, 3, 4], max_tokens=4))
    s0 = sched.schedule()
    assert chunks(s0) == [("a", 4, 0, [0], 0)]
    s1 = sched.schedule()  # position 4: the token s0 samples, in a new block
    assert chunks(s1) == [("a", 1, 1, [1], 1)] and s1.new_sequences == []
    assert sched.update(out(s0, ("a", 7))).outputs == [SeqOutput("a", 0, [7], None)]
    s2 = sched.schedule()
    assert chunks(s2) == [("a", 1, 2, [], 1)]
    assert sched.update(out(s1, ("a", 8))).outputs == [SeqOutput("a", 0, [8], None)]
    seq = sched.running[0]
    assert (seq.token_ids, seq.num_computed, seq.num_scheduled, seq.num_pending) == (
        [1, 2, 3, 4, 7, 8], 5, 6, 1,
    )  # fmt: skip


def test_eos_ends_one_step_late_and_the_extra_token_is_discarded():
    sched = make_scheduler(block_size=4)
    sched.add_request(request("a", [1, 2, 3, 4], max_tokens=8))
    s0, s1 = sched.schedule(), sched.schedule()
    assert chunks(s1) == [("a", 1, 1, [1], 1)]
    sched.add_request(request("b", [5, 6]))
    assert sched.update(out(s0, ("a", 0))).outputs == [SeqOutput("a", 0, [0], "stop")]
    assert sched.blocks.block_table("a") == [0, 1]  # NOTE: s1 still writes position 4
    s2 = sched.schedule()
    assert s2.finished_seq_ids == ["a"] and chunks(s2) == [("b", 2, 0, [2], 0)]
    assert sched.update(out(s1, ("a", 9))).outputs == []  # over-generated: discarded
    assert not sched.blocks.has_blocks("a")
    assert sched.blocks.free_block_ids()[-1] == 1  # its slot's block is free again
    sched.blocks.check_invariants()


def test_the_last_token_is_not_planned_ahead():
    sched = make_scheduler()
    sched.add_request(request("a", [1, 2, 3], max_tokens=2))
    s0, s1 = sched.schedule(), sched.schedule()
    assert chunks(s1) == [("a", 1, 1, [], 1)]
    sched.update(out(s0, ("a", 5)))
    assert sched.schedule() is None  # s1 samples the second and last token
    tokens = sched.update(out(s1, ("a", 6)))
    assert tokens.outputs == [SeqOutput("a", 0, [6], "length")]
    assert sched.schedule() is None and not sched.has_unfinished


def test_max_model_len_is_not_planned_past():
    sched = make_scheduler(max_model_len=5)
    sched.add_request(request("a", [1, 2, 3, 4], max_tokens=1))
    sched.add_request(request("b", [1, 2, 3, 4], max_tokens=None))
    s0 = sched.schedule()
    assert sched.schedule() is None  # a's token is its last; b's reaches max_model_len
    sched.update(out(s0, ("a", 5), ("b", 6)))
    assert not sched.has_unfinished


def test_grammar_rows_step_synchronously():
    sched = make_scheduler()
    spec = GrammarSpec(kind="json_object", spec="")
    sched.add_request(request("g", [1, 2, 3], grammar=spec))
    sched.add_request(request("p", [4, 5, 6]))
    s0 = sched.schedule()
    s1 = sched.schedule()
    assert chunks(s1) == [("p", 1, 1, [], 1)]  # g waits for its token
    sched.update(out(s0, ("g", 7), ("p", 8)))
    s2 = sched.schedule()
    assert chunks(s2) == [("g", 1, 1, [], 0), ("p", 1, 1, [2], 1)]  # g's token is known
    sched.update(out(s1, ("p", 9)))
    s3 = sched.schedule()
    assert [c[0] for c in chunks(s3)] == ["p"]


def test_a_grammar_only_batch_waits_for_each_step():
    sched = make_scheduler()
    sched.add_request(request("g", [1, 2, 3], grammar=GrammarSpec(kind="json_object", spec="")))
    s0 = sched.schedule()
    assert sched.schedule() is None
    sched.update(out(s0, ("g", 7)))
    assert chunks(sched.schedule()) == [("g", 1, 1, [], 0)]


def test_forks_wait_for_the_leaders_prompt():
    sched = make_scheduler(block_size=4)
    sched.add_request(request("r", [1, 2, 3, 4, 5], n=2))
    s0 = sched.schedule()
    assert sched.schedule() is None  # the leader's samples fork after s0
    sched.update(out(s0, ("r#0", 7)))
    s1 = sched.schedule()
    assert [(c[0], c[4]) for c in chunks(s1)] == [("r#0", 0), ("r#1", 0)]


def test_a_finished_ids_namesake_waits_for_its_blocks():
    """A new request may reuse the id of one whose step is still in flight."""
    sched = make_scheduler(block_size=4)
    sched.add_request(request("a", [1, 2, 3, 4]))
    s0, s1 = sched.schedule(), sched.schedule()
    sched.update(out(s0, ("a", 0)))  # eos: finished, s1 still computes it
    sched.add_request(request("a", [9, 9]))
    assert sched.schedule() is None  # its blocks would mix with the namesake's
    assert sched.update(out(s1, ("a", 5))).outputs == []  # not the new request's token
    s2 = sched.schedule()
    assert s2.finished_seq_ids == ["a"] and chunks(s2) == [("a", 2, 0, [2], 0)]
    assert sched.update(out(s2, ("a", 6))).outputs[-1] == SeqOutput("a", 0, [6], None)


def test_a_failed_step_while_the_next_is_planned():
    sched = make_scheduler(block_size=4)
    d = OverlapDriver(sched)
    sched.add_request(request("a", [1, 2, 3, 4, 5]))
    d.plan()
    sched.add_request(request("b", [7, 8, 9], max_tokens=3))
    d.step()  # step 0 done; step 1 (a's placeholder) runs, step 2 planned: a, b
    assert chunks(d.in_flight[0]) == [("a", 1, 2, [], 1)]
    d.step()  # takes step 1, plans step 3
    step, tokens = d.step(fail=True)  # step 2 (a and b) fails while step 3 is planned
    assert sorted(tokens.outputs, key=lambda o: o.request_id) == [
        SeqOutput("a", 0, [], "error"),
        SeqOutput("b", 0, [], "error"),
    ]
    sched.add_request(request("c", [4, 4, 4], max_tokens=2))
    d.run()
    assert d.tokens_of("c") and len(d.tokens_of("c")) == 2
    assert d.runner.num_placeholders > 0
    assert sched.blocks.num_used_blocks == 0 and not sched.has_unfinished
    sched.blocks.check_invariants()


def test_abort_with_two_steps_in_flight_frees_after_the_last():
    sched = make_scheduler(block_size=4)
    sched.add_request(request("a", [1, 2, 3, 4]))
    s0, s1 = sched.schedule(), sched.schedule()
    sched.abort("a")
    assert sched.take_finished_aborts().outputs == [SeqOutput("a", 0, [], "abort")]
    assert sched.update(out(s0, ("a", 5))).outputs == []
    assert sched.blocks.has_blocks("a")
    assert sched.update(out(s1, ("a", 6))).outputs == []
    assert sched.blocks.num_used_blocks == 0


def _tokens_by_position(eos_every: int):
    """A token that depends only on (sequence, length): the same whatever the schedule."""

    def next_token(seq_id: str, tokens: list[int]) -> int:
        h = zlib.crc32(f"{seq_id}:{len(tokens)}".encode())
        return 0 if eos_every and h % eos_every == 0 else 1 + h % 40

    return next_token


def _workload(sched, rng: random.Random) -> None:
    prefix = list(range(1, 13))
    for i in range(24):
        prompt = prefix[: rng.randint(0, 12)] + [
            rng.randint(1, 9) for _ in range(rng.randint(1, 6))
        ]
        sampling = dict(n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randint(1, 12))
        if rng.random() < 0.2:
            sampling.update(min_tokens=2)
        sched.add_request(request(f"r{i}", prompt, **sampling))


def _finished_outputs(driver):
    tokens, reasons = {}, {}
    for o in driver.outputs:
        key = (o.request_id, o.index)
        tokens.setdefault(key, []).extend(o.token_ids)
        if o.finish_reason is not None:
            assert key not in reasons, f"{key} finished twice"
            reasons[key] = o.finish_reason
    return tokens, reasons


def _run(driver_cls, seed: int):
    rng = random.Random(seed)
    num_blocks = rng.randint(8, 16)
    sched = make_scheduler(
        num_blocks, 4, max_model_len=32, max_num_batched_tokens=rng.choice([8, 16, 64]),
        max_num_seqs=rng.choice([2, 4, 8]),
    )  # fmt: skip
    runner = FakeRunner(num_blocks, 4, _tokens_by_position(eos_every=9))
    d = driver_cls(sched, runner)
    _workload(sched, rng)
    d.run(5000)
    assert sched.blocks.num_used_blocks == 0 and not sched.has_unfinished
    sched.blocks.check_invariants()
    return d


def test_outputs_equal_the_synchronous_schedule():
    """Same tokens and finish reasons with overlap as without, under preemption (small
    caches), prefix hits, forks, eos, min_tokens and chunked prefill."""
    preempted = [0, 0]
    for seed in range(12):
        sync, overlap = _run(Driver, seed), _run(OverlapDriver, seed)
        tokens, reasons = _finished_outputs(sync)
        assert _finished_outputs(overlap) == (tokens, reasons)
        assert set(tokens) == set(reasons) and "stop" in reasons.values()
        assert overlap.runner.num_placeholders > 0
        preempted[0] += sync.sched.stats().num_preemptions > 0
        preempted[1] += overlap.sched.stats().num_preemptions > 0
    assert min(preempted) >= 3, preempted


@pytest.mark.parametrize("seed", range(8))
def test_random_aborts_and_faults_keep_the_invariants(seed):
    rng = random.Random(seed)
    num_blocks = rng.randint(8, 20)
    sched = make_scheduler(num_blocks, 2, max_model_len=32, max_num_batched_tokens=10)
    d = OverlapDriver(sched, FakeRunner(num_blocks, 2, _tokens_by_position(eos_every=7)))
    _workload(sched, rng)
    for _ in range(400):
        if rng.random() < 0.1 and sched._requests:
            sched.abort(rng.choice(sorted(sched._requests)), rng.choice([None, 0, 1]))
            d.outputs.extend(sched.take_finished_aborts().outputs)
        if d.step(fail=rng.random() < 0.05) is None:
            break
    d.run(5000)
    tokens, reasons = _finished_outputs(d)
    assert set(tokens) == set(reasons)  # every sample that emitted anything finished once
    assert sched.blocks.num_used_blocks == 0 and not sched.has_unfinished
    assert (
        len(sched.blocks.free_block_ids()) + len(sched.blocks.evictable_block_ids()) == num_blocks
    )
    sched.blocks.check_invariants()
