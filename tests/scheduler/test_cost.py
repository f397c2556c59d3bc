"""Cost attribution: a step's device time split by token share; drain at shutdown."""

from __future__ import annotations

import pytest

from actors.scheduler.scheduler import Scheduler
from tests.scheduler.fake_runner import (
    Driver,
    FakeRunner,
    counter_tokens,
    make_scheduler,
    request,
)

SECONDS_PER_TOKEN = 0.001  # the fake device's time per computed token: each share is exact


def timed_driver(sched: Scheduler) -> Driver:
    blocks = sched.blocks
    runner = FakeRunner(blocks.num_blocks, blocks.block_size, counter_tokens(),
                        seconds_per_token=SECONDS_PER_TOKEN)  # fmt: skip
    return Driver(sched, runner)


def final_gpu_seconds(driver: Driver, request_id: str) -> float:
    ends = [o for o in driver.outputs if o.request_id == request_id and o.finish_reason]
    return max(o.gpu_seconds for o in ends)


def test_each_request_pays_for_the_tokens_it_had_computed():
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=16)
    sched.add_request(request("a", list(range(1, 21)), feature="search", max_tokens=5))
    sched.add_request(request("b", list(range(30, 37)), feature="chat", max_tokens=3))
    sched.add_request(request("c", list(range(40, 43)), feature="chat", max_tokens=4, n=2))
    d = timed_driver(sched)
    d.run()
    # a prompt computed once, then one token per later output (the last sampled is never fed)
    assert final_gpu_seconds(d, "a") == pytest.approx((20 + 5 - 1) * SECONDS_PER_TOKEN)
    assert final_gpu_seconds(d, "b") == pytest.approx((7 + 3 - 1) * SECONDS_PER_TOKEN)
    # n=2: sample 1 forks after the prompt and recomputes its last token
    assert final_gpu_seconds(d, "c") == pytest.approx((3 + 1 + 2 * 3) * SECONDS_PER_TOKEN)
    by_feature = sched.stats().gpu_seconds_by_feature
    assert by_feature["search"] == pytest.approx(final_gpu_seconds(d, "a"))
    chat = final_gpu_seconds(d, "b") + final_gpu_seconds(d, "c")
    assert by_feature["chat"] == pytest.approx(chat)
    stats = sched.stats()
    assert stats.generation_tokens == 5 + 3 + 2 * 4
    assert stats.prompt_tokens_computed == 20 + 7 + 3 + 1


def test_iteration_tokens_are_reported_once_per_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(request("a", list(range(1, 13)), max_tokens=2))
    d = timed_driver(sched)
    d.run()
    assert sched.stats().iteration_tokens == [8, 4, 1]
    assert sched.stats().iteration_tokens == []


def test_work_of_a_step_aborted_while_it_ran_is_charged():
    sched = make_scheduler()
    sched.add_request(request("a", list(range(1, 11)), feature="f", max_tokens=50))
    d = timed_driver(sched)
    d.step()
    step = sched.schedule()
    sched.abort("a")
    d.outputs.extend(sched.update(d.runner.execute(step)).outputs)
    assert sched.stats().gpu_seconds_by_feature["f"] == pytest.approx(11 * SECONDS_PER_TOKEN)
    assert [o.finish_reason for o in d.outputs if o.finish_reason] == ["abort"]


def test_drain_aborts_the_requests_never_started():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(request("running", [1, 2, 3], max_tokens=6))
    sched.add_request(request("waiting", [4, 5, 6], max_tokens=6))
    d = timed_driver(sched)
    d.step()
    sched.drain()
    d.run()
    ends = {o.request_id: o.finish_reason for o in d.outputs if o.finish_reason}
    assert ends == {"running": "length", "waiting": "abort"}
    assert len(d.tokens_of("running")) == 6 and d.tokens_of("waiting") == []
