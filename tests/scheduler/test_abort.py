"""Aborts at every stage return every block and are reported once."""

from __future__ import annotations

from actors.protocol import SeqOutput
from model_runner.step_input import SampledToken, StepOutput
from tests.scheduler.fake_runner import Driver, make_scheduler, request


def assert_all_blocks_back(sched):
    bm = sched.blocks
    bm.check_invariants()
    assert bm.num_used_blocks == 0 and sched.stats().kv_cache_usage == 0.0
    assert len(bm.free_block_ids()) + len(bm.evictable_block_ids()) == bm.num_blocks


def test_abort_while_waiting():
    sched = make_scheduler()
    sched.add_request(request("a", [1, 2, 3]))
    sched.abort("a", None, "abort")
    tokens = sched.take_finished_aborts()
    assert [p.request_id for p in tokens.started] == ["a"]
    assert tokens.outputs == [SeqOutput("a", 0, [], "abort")]
    assert not sched.has_unfinished and sched.schedule() is None
    assert sched.take_finished_aborts().outputs == []
    sched.add_request(request("a", [1, 2, 3]))  # the id is free again
    assert sched.schedule().finished_seq_ids == []  # the runner never saw the first one
    sched.abort("unknown", None, "abort")


def test_abort_while_prefilling_in_chunks():
    sched = make_scheduler(max_num_batched_tokens=4)
    d = Driver(sched)
    sched.add_request(request("a", list(range(1, 11))))
    d.step()
    assert sched.blocks.block_table("a") == [0]
    sched.abort("a", None, "abort")
    assert sched.take_finished_aborts().outputs == [SeqOutput("a", 0, [], "abort")]
    assert_all_blocks_back(sched)
    assert sched.blocks.evictable_block_ids() == [0]  # its computed full block stays cached
    sched.add_request(request("b", [7, 8]))
    step, _ = d.step()
    assert step.finished_seq_ids == ["a"]
    assert d.runner.seqs.keys() == {"b"}


def test_abort_while_decoding():
    sched = make_scheduler()
    d = Driver(sched)
    sched.add_request(request("a", [1, 2, 3, 4, 5]))
    sched.add_request(request("b", [6, 7, 8]))
    d.step()
    d.step()
    sched.abort("a", None, "abort")
    assert sched.stats().num_running == 1
    assert sched.blocks.block_table("a") == []
    assert [sched.blocks.ref_count(b) for b in range(3)] == [0, 0, 1]
    step, tokens = d.step()
    assert step.finished_seq_ids == ["a"] and [c.seq_id for c in step.chunks] == ["b"]
    assert tokens.outputs[0] == SeqOutput("a", 0, [], "abort")  # update() reports it too
    assert [o.request_id for o in tokens.outputs[1:]] == ["b"]
    sched.abort("b", None, "abort")
    assert_all_blocks_back(sched)


def test_abort_during_the_step_in_flight():
    sched = make_scheduler()
    sched.add_request(request("a", [1, 2, 3, 4, 5]))
    step = sched.schedule()
    sched.abort("a", None, "abort")
    assert sched.stats().num_blocks_in_use == 2  # the runner still writes into them
    tokens = sched.update(StepOutput(step_id=step.step_id, sampled=[SampledToken("a", 9)]))
    assert tokens.outputs == [SeqOutput("a", 0, [], "abort")]  # the sampled token is dropped
    assert_all_blocks_back(sched)
    assert sched.blocks.evictable_block_ids() == []  # never computed: nothing cached
    sched.add_request(request("b", [1, 2, 3, 4, 5]))
    step = sched.schedule()
    assert step.finished_seq_ids == ["a"] and step.new_sequences[0].num_computed_tokens == 0


def test_abort_with_reason_stop_is_not_reported_back():
    sched = make_scheduler()
    d = Driver(sched)
    sched.add_request(request("a", [1, 2, 3]))
    d.step()
    sched.abort("a", 0, "stop")
    assert sched.take_finished_aborts().outputs == []
    assert_all_blocks_back(sched)


def test_abort_one_forked_sample_then_the_rest():
    sched = make_scheduler()
    d = Driver(sched)
    sched.add_request(request("r", [1, 2, 3, 4, 5, 6], n=3, max_tokens=8))
    d.step()
    d.step()
    bm = sched.blocks
    assert [bm.block_table(f"r#{i}") for i in range(3)] == [[0, 2], [0, 3], [0, 1]]
    sched.abort("r", 1, "abort")
    assert sched.take_finished_aborts().outputs == [SeqOutput("r", 1, [], "abort")]
    assert [bm.ref_count(b) for b in range(4)] == [2, 1, 1, 0]
    step, _ = d.step()
    assert step.finished_seq_ids == ["r#1"]
    assert [c.seq_id for c in step.chunks] == ["r#0", "r#2"]
    sched.abort("r", None, "abort")
    tokens = sched.take_finished_aborts()
    assert tokens.started == []
    assert tokens.outputs == [SeqOutput("r", 0, [], "abort"), SeqOutput("r", 2, [], "abort")]
    assert not sched.has_unfinished
    assert_all_blocks_back(sched)


def test_abort_every_sample_before_the_fork():
    sched = make_scheduler(max_num_batched_tokens=4)
    d = Driver(sched)
    sched.add_request(request("r", list(range(1, 11)), n=3))
    d.step()
    sched.abort("r", None, "abort")
    tokens = sched.take_finished_aborts()
    assert len(tokens.started) == 1 and tokens.started[0].n == 3
    assert [(o.index, o.finish_reason) for o in tokens.outputs] == [
        (1, "abort"),
        (2, "abort"),
        (0, "abort"),
    ]
    assert not sched.has_unfinished
    assert_all_blocks_back(sched)


def test_aborting_sample_0_before_the_fork_hands_the_prompt_to_sample_1():
    sched = make_scheduler(max_num_batched_tokens=4)
    d = Driver(sched)
    sched.add_request(request("r", list(range(1, 11)), n=3, seed=40, max_tokens=2))
    d.step()  # r#0 computed 4 of 10 prompt tokens
    sched.abort("r", 0, "abort")
    assert [s.seq_id for s in sched.waiting] == ["r#1"]
    step, _ = d.step()
    assert step.finished_seq_ids == ["r#0"]
    new = step.new_sequences[0]
    assert (new.seq_id, new.seed, new.num_computed_tokens) == ("r#1", 41, 4)  # a prefix hit
    d.run()
    assert [len(d.tokens_of("r", i)) for i in range(3)] == [0, 2, 2]
    assert_all_blocks_back(sched)


def test_abort_everything_in_flight_under_preemption_pressure():
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=8)
    d = Driver(sched)
    for i in range(4):
        sched.add_request(request(f"q{i}", list(range(i, i + 7)), n=2, max_tokens=12))
    for _ in range(6):
        d.step()
    assert sched.stats().num_preemptions > 0
    step = sched.schedule()
    for i in range(4):
        sched.abort(f"q{i}", None, "abort")
    sched.update(d.runner.execute(step))
    assert not sched.has_unfinished
    assert_all_blocks_back(sched)
