"""Random operation sequences (hypothesis) keep the block and request invariants.

After every operation: no block both free and referenced, ref counts equal the number of
block tables holding the block, tables only for running sequences (or ones aborted while
the step ran), the fake runner's view (tables, tokens, progress, KV contents) agrees with
the scheduler's. At the end, once everything finished: no block in use, free + cached ==
total, and every sample of every accepted request reported finished exactly once.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actors.protocol import StepTokens
from actors.scheduler.errors import AdmissionError
from tests.scheduler.fake_runner import Driver, FakeRunner, make_scheduler, request

PREFIXES = [list(range(1, 17)), [3] * 16, [5, 6] * 8]

add_op = st.tuples(
    st.just("add"),
    st.integers(0, len(PREFIXES) - 1),
    st.one_of(st.sampled_from([5, 9, 13, 16]), st.integers(0, 16)),
    st.lists(st.integers(1, 6), max_size=3),
    st.integers(1, 3),
    st.integers(1, 8),
    st.sampled_from([None, None, "salt"]),
    st.booleans(),
)
abort_op = st.tuples(
    st.sampled_from(["abort", "abort_in_flight"]),
    st.integers(0, 1000),
    st.one_of(st.none(), st.integers(0, 2)),
)
step_op = st.tuples(st.just("step"), st.integers(1, 6))
op = st.one_of(
    add_op,
    add_op,
    add_op,
    step_op,
    step_op,
    step_op,
    abort_op,
    st.just(("fail",)),
    st.just(("reset",)),
)
engine = st.fixed_dictionaries(
    {
        "num_blocks": st.integers(4, 24),
        "block_size": st.sampled_from([2, 4]),
        "max_num_batched_tokens": st.integers(3, 20),
        "max_num_seqs": st.integers(1, 5),
        "enable_prefix_caching": st.sampled_from([True, True, False]),
    }
)


class Ledger:
    """Every request's samples: started once, outputs only before their single finish."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.max_tokens: dict[str, int] = {}
        self.started: set[str] = set()
        self.finished: set[tuple[str, int]] = set()
        self.num_tokens: dict[tuple[str, int], int] = {}

    def record(self, tokens: StepTokens) -> None:
        for params in tokens.started:
            assert params.request_id not in self.started
            assert params.n == self.n[params.request_id]
            self.started.add(params.request_id)
        for out in tokens.outputs:
            key = (out.request_id, out.index)
            assert out.request_id in self.started and key not in self.finished
            count = self.num_tokens[key] = self.num_tokens.get(key, 0) + len(out.token_ids)
            assert count <= self.max_tokens[out.request_id]
            if out.finish_reason is not None:
                self.finished.add(key)

    def all_finished(self) -> bool:
        expected = {(rid, i) for rid, n in self.n.items() for i in range(n)}
        return self.finished == expected


def check(d: Driver) -> None:
    d.check()
    sched = d.sched
    holders = sched.blocks.seq_ids()
    running = {s.seq_id for s in sched.running}
    assert running <= holders
    assert not holders - running, f"tables of finished or waiting sequences: {holders - running}"
    assert all(not sched.blocks.has_blocks(s.seq_id) for s in sched.waiting)


def apply(d: Driver, ledger: Ledger, op, rng: random.Random, counter: list[int]) -> None:
    sched = d.sched
    kind = op[0]
    if kind == "add":
        _, which, cut, tail, n, max_tokens, salt, ignore_eos = op
        rid = f"req{counter[0]}"
        counter[0] += 1
        prompt = PREFIXES[which][:cut] + tail or [7]
        try:
            sched.add_request(
                request(rid, prompt, salt, n=n, max_tokens=max_tokens, ignore_eos=ignore_eos)
            )
        except AdmissionError as e:
            assert e.status == 400 and e.param == "prompt"
            return
        ledger.n[rid], ledger.max_tokens[rid] = n, max_tokens
    elif kind == "step":
        for _ in range(op[1]):
            step = sched.schedule()
            if step is None:
                assert not sched.has_unfinished
                break
            ledger.record(sched.update(d.runner.execute(step)))
    elif kind in ("abort", "abort_in_flight"):
        live = sorted(sched._requests)
        if not live:
            return
        step = sched.schedule() if kind == "abort_in_flight" else None
        sched.abort(live[op[1] % len(live)], op[2], "abort")
        if step is not None:
            ledger.record(sched.update(d.runner.execute(step)))
    elif kind == "fail":
        step = sched.schedule()
        if step is not None:
            d.runner.fail(step)
            ledger.record(sched.fail_step(step.step_id))
    elif kind == "reset":
        assert sched.reset_prefix_cache() is True
    ledger.record(sched.take_finished_aborts())


@settings(
    max_examples=int(os.environ.get("SCHEDULER_PROPERTY_EXAMPLES", "400")),
    deadline=None,
    derandomize="SCHEDULER_PROPERTY_EXPLORE" not in os.environ,  # NOTE: stable in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(engine=engine, ops=st.lists(op, min_size=10, max_size=60), seed=st.integers(0, 2**16))
def test_random_operations_keep_the_invariants(engine, ops, seed):
    rng = random.Random(seed)
    num_blocks, block_size = engine.pop("num_blocks"), engine.pop("block_size")
    sched = make_scheduler(num_blocks, block_size, max_model_len=32, eos=(0,), **engine)
    runner = FakeRunner(num_blocks, block_size, lambda seq_id, tokens: rng.randrange(0, 8))
    d = Driver(sched, runner)
    ledger = Ledger()
    counter = [0]
    for operation in ops:
        apply(d, ledger, operation, rng, counter)
        check(d)
    for _ in range(2000):
        step = sched.schedule()
        if step is None:
            break
        ledger.record(sched.update(runner.execute(step)))
        check(d)
    ledger.record(sched.take_finished_aborts())
    stats = sched.stats()
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    event(f"forked: {any(n > 1 for n in ledger.n.values())}")
    assert not sched.has_unfinished
    assert ledger.all_finished()
    bm = sched.blocks
    assert bm.num_used_blocks == 0 and sched.stats().kv_cache_usage == 0.0
    assert len(bm.free_block_ids()) + len(bm.evictable_block_ids()) == num_blocks
    bm.check_invariants()


@pytest.mark.parametrize("seed", range(6))
def test_shared_prefix_workload_under_pressure(seed):
    """Many requests over three shared prefixes on a tiny cache: hits, forks, preemptions,
    evictions and aborts all at once, every step checked."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    num_blocks = rng.randint(8, 16)
    sched = make_scheduler(
        num_blocks, block_size, max_model_len=40, eos=(0,), max_num_batched_tokens=12
    )
    runner = FakeRunner(num_blocks, block_size, lambda seq_id, tokens: rng.randrange(0, 12))
    d = Driver(sched, runner)
    ledger = Ledger()
    for i in range(120):
        if rng.random() < 0.5:
            prompt = PREFIXES[rng.randrange(3)][: rng.randint(5, 16)] + [rng.randint(1, 6)]
            n, max_tokens = rng.choice([1, 1, 2, 4]), rng.randint(1, 10)
            salt = rng.choice([None, None, "s"])
            ledger.n[f"r{i}"], ledger.max_tokens[f"r{i}"] = n, max_tokens
            sched.add_request(request(f"r{i}", prompt, salt, n=n, max_tokens=max_tokens))
        step = sched.schedule()
        if step is not None and rng.random() < 0.1 and sched._requests:
            sched.abort(rng.choice(sorted(sched._requests)), rng.choice([None, 0, 1]), "abort")
        if step is not None:
            ledger.record(sched.update(runner.execute(step)))
        ledger.record(sched.take_finished_aborts())
        check(d)
    while (step := sched.schedule()) is not None:
        ledger.record(sched.update(runner.execute(step)))
        check(d)
    ledger.record(sched.take_finished_aborts())
    stats = sched.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    assert ledger.all_finished() and stats.num_blocks_in_use == 0
    assert len(sched.blocks.free_block_ids()) + len(sched.blocks.evictable_block_ids()) == (
        num_blocks
    )
