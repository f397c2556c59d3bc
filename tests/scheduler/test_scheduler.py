"""Scheduler policy: batching, chunked prefill, preemption, admission, finishing, stats."""

from __future__ import annotations

import msgspec
import pytest

from actors.protocol import DetokParams, SeqOutput
from actors.scheduler.errors import AdmissionError
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence, SampledToken, StepOutput
from tests.scheduler.fake_runner import Driver, FakeRunner, make_scheduler, request


def chunks(step):
    return [(c.seq_id, c.num_tokens, c.block_table_start, c.block_ids) for c in step.chunks]


def test_engine_config_is_accepted():
    from actors.scheduler.scheduler import Scheduler
    from model_runner.config import EngineConfig

    sched = Scheduler(EngineConfig(max_num_seqs=3), 10, 16, 128, [2])
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_waiting) == (3, 2048, 1024)
    assert sched.blocks.enable_prefix_caching and sched.blocks.num_blocks == 10


def test_chunked_prefill_splits_a_prompt_under_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    d = Driver(sched)
    prompt = list(range(1, 21))
    sched.add_request(request("a", prompt, max_tokens=2))
    step, tokens = d.step()
    assert step.new_sequences == [
        NewSequence(
            seq_id="a",
            token_ids=prompt,
            num_prompt_tokens=20,
            block_ids=[],
            num_computed_tokens=0,
            sampling=SamplingParams(max_tokens=2),
        )
    ]
    assert chunks(step) == [("a", 8, 0, [0, 1])]
    assert tokens.outputs == [] and tokens.started == []
    step, tokens = d.step()
    assert step.new_sequences == [] and chunks(step) == [("a", 8, 2, [2, 3])]
    step, tokens = d.step()
    assert chunks(step) == [("a", 4, 4, [4])]
    assert 0 <= tokens.started[0].queue_seconds < 5  # arrival to first scheduled
    started = [msgspec.structs.replace(p, queue_seconds=0.0) for p in tokens.started]
    assert started == [
        DetokParams(
            request_id="a",
            n=1,
            stop=[],
            include_stop_str_in_output=False,
            skip_special_tokens=True,
            num_prompt_tokens=20,
            num_cached_tokens=0,
            prompt_tail=[16, 17, 18, 19, 20],
        )
    ]
    assert tokens.outputs == [SeqOutput("a", 0, [100])]
    step, tokens = d.step()
    assert chunks(step) == [("a", 1, 5, [5])]
    assert tokens.started == [] and tokens.outputs == [SeqOutput("a", 0, [101], "length")]
    assert sched.schedule() is None and not sched.has_unfinished
    assert sched.stats().num_blocks_in_use == 0


def test_decodes_first_then_prefill_chunks_in_one_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    d = Driver(sched)
    sched.add_request(request("A", [1, 2, 3, 4], max_tokens=5))
    step, _ = d.step()
    assert chunks(step) == [("A", 4, 0, [0])]
    sched.add_request(request("B", list(range(10, 30)), max_tokens=1))
    step, _ = d.step()
    assert chunks(step) == [("A", 1, 1, [1]), ("B", 7, 0, [2, 3])]
    step, _ = d.step()
    assert chunks(step) == [("A", 1, 2, []), ("B", 7, 2, [4, 5])]
    step, tokens = d.step()
    assert chunks(step) == [("A", 1, 2, []), ("B", 6, 4, [6])]
    assert [o.request_id for o in tokens.outputs] == ["A", "B"]
    assert tokens.outputs[1].finish_reason == "length"


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    d = Driver(sched)
    for rid in "ABC":
        sched.add_request(request(rid, [1, 2, 3, 4, 5], max_tokens=2))
    step, _ = d.step()
    assert [c.seq_id for c in step.chunks] == ["A", "B"]
    assert sched.stats().num_running == 2 and sched.stats().num_waiting == 1
    step, _ = d.step()
    assert [c.seq_id for c in step.chunks] == ["A", "B"]  # both finish here
    step, _ = d.step()
    assert [c.seq_id for c in step.chunks] == ["C"]
    assert step.finished_seq_ids == ["A", "B"]
    assert step.new_sequences[0].num_computed_tokens == 4  # A's first block was cached


def test_preemption_by_recompute_and_resumption():
    sched = make_scheduler(num_blocks=4)
    d = Driver(sched)
    sched.add_request(request("A", [1, 2, 3, 4, 5, 6], max_tokens=5))
    sched.add_request(request("B", [11, 12, 13, 14, 15, 16], max_tokens=8))
    step, _ = d.step()
    assert chunks(step) == [("A", 6, 0, [0, 1]), ("B", 6, 0, [2, 3])]
    step, _ = d.step()
    assert chunks(step) == [("A", 1, 2, []), ("B", 1, 2, [])]
    step, _ = d.step()
    assert chunks(step) == [("A", 1, 2, []), ("B", 1, 2, [])]
    # A needs a third block: B, the newest, is preempted; its cached blocks go to the LRU
    # list and A evicts the least recently used one (B's tail block 3).
    step, _ = d.step()
    assert chunks(step) == [("A", 1, 2, [3])] and step.finished_seq_ids == ["B"]
    assert sched.stats().num_preemptions == 1
    assert [s.seq_id for s in sched.waiting] == ["B"]
    assert sched.blocks.evictable_block_ids() == [2]
    # B cannot come back yet (needs 3 blocks, 1 available); A finishes this step.
    step, tokens = d.step()
    assert chunks(step) == [("A", 1, 3, [])]
    assert tokens.outputs == [SeqOutput("A", 0, [107], "length")]
    assert sched.blocks.free_block_ids() == [3]
    assert sched.blocks.evictable_block_ids() == [2, 1, 0]
    # B resumes: prompt + its outputs so far; its first block is a prefix hit (block 2).
    step, _ = d.step()
    assert step.finished_seq_ids == ["A"]
    assert step.new_sequences == [
        NewSequence(
            seq_id="B",
            token_ids=[11, 12, 13, 14, 15, 16, 101, 103, 105],
            num_prompt_tokens=6,
            num_output_tokens=3,
            block_ids=[2],
            num_computed_tokens=4,
            sampling=SamplingParams(max_tokens=8),
        )
    ]
    assert chunks(step) == [("B", 5, 1, [3, 1])]
    d.run()
    assert d.tokens_of("B") == [101, 103, 105, 108, 109, 110, 111, 112]
    assert d.tokens_of("A") == [100, 102, 104, 106, 107]
    stats = sched.stats()
    assert (stats.num_preemptions, stats.prefix_cache_queries, stats.prefix_cache_hits) == (
        1,
        12,
        0,
    )
    assert stats.num_blocks_in_use == 0 and stats.kv_cache_usage == 0.0


def test_a_sequence_alone_that_outgrows_the_cache_finishes_with_length():
    sched = make_scheduler(num_blocks=2)
    d = Driver(sched)
    sched.add_request(request("a", [1, 2, 3, 4, 5, 6], max_tokens=20))
    assert d.run() == 3
    assert d.outputs[-1] == SeqOutput("a", 0, [], "length")
    assert d.tokens_of("a") == [100, 101, 102]
    assert sched.take_finished_aborts().outputs == []
    assert sched.stats().num_blocks_in_use == 0


@pytest.mark.parametrize(
    "prompt_len, max_tokens, param, words",
    [
        (60, 10, "max_tokens", "'max_tokens' or 'max_completion_tokens' is too large: 10"),
        (64, None, "prompt", "maximum context length is 64 tokens"),
        (0, 4, "prompt", "The prompt is empty"),
    ],
)
def test_admission_refuses_what_can_never_fit(prompt_len, max_tokens, param, words):
    sched = make_scheduler()
    with pytest.raises(AdmissionError) as e:
        sched.add_request(request("a", [5] * prompt_len, max_tokens=max_tokens))
    assert (e.value.status, e.value.param, e.value.type) == (400, param, "BadRequestError")
    assert words in e.value.message
    assert not sched.has_unfinished


def test_admission_refuses_a_prompt_larger_than_the_kv_cache():
    sched = make_scheduler(num_blocks=4, max_model_len=1000)
    sched.add_request(request("ok", [5] * 16, max_tokens=100))
    with pytest.raises(AdmissionError) as e:
        sched.add_request(request("big", [5] * 17, max_tokens=4))
    assert (e.value.status, e.value.param, e.value.code) == (400, "prompt", "kv_cache_exceeded")
    assert "4 blocks of 4 tokens" in e.value.message


def test_admission_answers_503_when_the_waiting_queue_is_full():
    sched = make_scheduler(max_waiting=2)
    sched.add_request(request("a", [1, 2]))
    sched.add_request(request("b", [1, 2]))
    with pytest.raises(AdmissionError) as e:
        sched.add_request(request("c", [1, 2]))
    assert e.value.status == 503 and e.value.retry_after == 1.0
    assert e.value.type == "ServiceUnavailableError"
    with pytest.raises(AdmissionError) as e:
        sched.add_request(request("a", [1, 2]))
    assert (e.value.status, e.value.code) == (400, "duplicate_request_id")


def test_max_tokens_none_runs_to_max_model_len():
    sched = make_scheduler(max_model_len=8)
    d = Driver(sched)
    sched.add_request(request("a", [1, 2, 3, 4, 5, 6], max_tokens=None))
    d.run()
    assert d.outputs == [SeqOutput("a", 0, [100]), SeqOutput("a", 0, [101], "length")]


def scripted(script):
    return lambda seq_id, tokens: script[seq_id].pop(0)


@pytest.mark.parametrize(
    "sampling, script, expected",
    [
        ({}, [5, 0, 9], [[5], [0, "stop", None]]),
        ({"ignore_eos": True, "max_tokens": 3}, [0, 0, 0], [[0], [0], [0, "length", None]]),
        ({"stop_token_ids": [7]}, [7, 1], [[7, "stop", 7]]),
        ({"stop_token_ids": [7], "min_tokens": 2}, [0, 7, 1], [[0], [7, "stop", 7]]),
        ({"min_tokens": 3}, [0, 0, 0, 0], [[0], [0], [0, "stop", None]]),
    ],
)
def test_finish_rules(sampling, script, expected):
    sched = make_scheduler()
    runner = FakeRunner(16, 4, scripted({"a": list(script)}))
    d = Driver(sched, runner)
    sched.add_request(request("a", [1, 2, 3], **sampling))
    d.run()
    want = [SeqOutput("a", 0, [e[0]], *e[1:]) for e in expected]
    assert d.outputs == want
    assert sched.stats().num_blocks_in_use == 0


def test_logprobs_are_converted():
    sched = make_scheduler()
    sched.add_request(request("a", [1, 2, 3], logprobs=1))
    step = sched.schedule()
    top = [(9, -0.5), (4, -1.0)]
    out = StepOutput(step_id=step.step_id, sampled=[SampledToken("a", 9, -0.5, top)])
    tokens = sched.update(out)
    assert tokens.outputs == [SeqOutput("a", 0, [9], None, None, [(9, -0.5, top)])]


def test_at_most_two_steps_in_flight():
    sched = make_scheduler()
    sched.add_request(request("a", [1, 2, 3]))
    step = sched.schedule()
    ahead = sched.schedule()  # overlap: planned while `step` runs
    assert ahead.step_id == step.step_id + 1 and sched.num_steps_in_flight == 2
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError):
        sched.update(StepOutput(step_id=ahead.step_id))  # results come back in order
    sched.update(StepOutput(step_id=step.step_id, sampled=[SampledToken("a", 5)]))
    assert sched.schedule().step_id == ahead.step_id + 1


def test_fail_step_finishes_its_sequences_with_error():
    sched = make_scheduler()
    d = Driver(sched)
    sched.add_request(request("a", [1, 2, 3, 4, 5]))
    d.step()
    sched.add_request(request("b", [7, 8, 9]))
    step = sched.schedule()
    tokens = sched.fail_step(step.step_id)
    assert tokens.outputs == [SeqOutput("a", 0, [], "error"), SeqOutput("b", 0, [], "error")]
    assert [p.request_id for p in tokens.started] == ["b"]
    assert sched.stats().num_blocks_in_use == 0 and not sched.has_unfinished
    sched.blocks.check_invariants()
    assert sched.blocks.evictable_block_ids() == [0]  # a's computed first block stays cached
    sched.add_request(request("c", [1, 2, 3, 4, 5, 6]))
    step = sched.schedule()
    assert step.finished_seq_ids == ["a", "b"]
    assert step.new_sequences[0].num_computed_tokens == 4


def test_prefix_hits_cache_salt_and_stats():
    sched = make_scheduler()
    d = Driver(sched)
    prompt = list(range(1, 11))
    computed = {}
    for rid, salt in [("x1", "x"), ("y", "y"), ("x2", "x"), ("none", None)]:
        sched.add_request(request(rid, prompt, cache_salt=salt, max_tokens=1))
        step, tokens = d.step()
        computed[rid] = step.new_sequences[0].num_computed_tokens
        assert tokens.started[0].num_cached_tokens == computed[rid]
    assert computed == {"x1": 0, "y": 0, "x2": 8, "none": 0}
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (40, 8)
    assert stats.kv_cache_usage == 0.0 and stats.num_blocks_in_use == 0
    assert len(sched.blocks.evictable_block_ids()) == 6  # 3 salts x 2 full blocks, idle
    assert sched.reset_prefix_cache() is True
    assert sched.blocks.evictable_block_ids() == []
    sched.add_request(request("x3", prompt, cache_salt="x", max_tokens=1))
    step, _ = d.step()
    assert step.new_sequences[0].num_computed_tokens == 0


def test_prefix_caching_off():
    sched = make_scheduler(enable_prefix_caching=False)
    d = Driver(sched)
    for rid in ("a", "b"):
        sched.add_request(request(rid, list(range(1, 11)), max_tokens=1))
        step, _ = d.step()
        assert step.new_sequences[0].num_computed_tokens == 0
    assert sched.blocks.evictable_block_ids() == [] and sched.blocks.num_free_blocks == 16
    assert sched.stats().prefix_cache_queries == 0
