"""n > 1: sample 0 prefills, the others fork sharing every block, copy on write."""

from __future__ import annotations

from actors.protocol import SeqOutput
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence
from tests.scheduler.fake_runner import Driver, make_scheduler, request


def chunks(step):
    return [(c.seq_id, c.num_tokens, c.block_table_start, c.block_ids) for c in step.chunks]


def test_fork_shares_all_blocks_and_copies_the_partial_last_block_on_write():
    sched = make_scheduler()
    d = Driver(sched)
    prompt = [1, 2, 3, 4, 5, 6]
    sched.add_request(request("r", prompt, n=3, seed=42, max_tokens=3))
    step, tokens = d.step()
    assert [s.seq_id for s in step.new_sequences] == ["r#0"]
    assert step.new_sequences[0].seed == 42
    assert chunks(step) == [("r#0", 6, 0, [0, 1])]
    assert tokens.started[0].n == 3 and tokens.outputs == [SeqOutput("r", 0, [100])]
    # Forked: every sample holds the prompt's blocks.
    bm = sched.blocks
    assert [bm.block_table(f"r#{i}") for i in range(3)] == [[0, 1]] * 3
    assert (bm.ref_count(0), bm.ref_count(1)) == (3, 3)
    step, tokens = d.step()
    sampling = SamplingParams(n=3, seed=42, max_tokens=3)
    assert step.new_sequences == [
        NewSequence(
            seq_id=f"r#{i}",
            token_ids=prompt,
            num_prompt_tokens=6,
            block_ids=table,
            num_computed_tokens=5,
            sampling=sampling,
            seed=42 + i,
        )
        for i, table in [(1, [0]), (2, [0, 1])]
    ]
    # Sample 0 writes position 6 and sample 1 position 5 into shared block 1: both copy;
    # sample 2, its last holder, writes in place.
    assert step.block_copies == [(1, 2), (1, 3)]
    assert chunks(step) == [("r#0", 1, 1, [2]), ("r#1", 1, 1, [3]), ("r#2", 1, 2, [])]
    assert [bm.block_table(f"r#{i}") for i in range(3)] == [[0, 2], [0, 3], [0, 1]]
    assert [bm.ref_count(b) for b in range(4)] == [3, 1, 1, 1]
    assert [(o.index, o.token_ids) for o in tokens.outputs] == [(0, [101]), (1, [102]), (2, [103])]
    d.run()
    assert [d.tokens_of("r", i) for i in range(3)] == [
        [100, 101, 104],
        [102, 105, 107],
        [103, 106, 108],
    ]
    assert [o.finish_reason for o in d.outputs if o.finish_reason] == ["length"] * 3
    assert sched.stats().num_blocks_in_use == 0
    # Each sample's second block filled up (prompt tail + its own outputs) and is cached;
    # the prompt's full block 0, allocated once, is released last.
    assert sched.blocks.evictable_block_ids() == [2, 3, 1, 0]


def test_n_4_prompt_blocks_allocated_once_and_seeds_per_sample():
    sched = make_scheduler(num_blocks=32)
    d = Driver(sched)
    prompt = list(range(1, 19))  # 4 full blocks + 2 tokens
    sched.add_request(request("r", prompt, n=4, seed=7, max_tokens=4))
    d.step()
    d.step()
    tables = [sched.blocks.block_table(f"r#{i}") for i in range(4)]
    assert [t[:4] for t in tables] == [[0, 1, 2, 3]] * 4
    assert sorted(t[4] for t in tables) == [4, 5, 6, 7]
    assert [sched.blocks.ref_count(b) for b in range(8)] == [4, 4, 4, 4, 1, 1, 1, 1]
    assert sched.stats().num_blocks_in_use == 8
    d.run()
    assert sched.stats().num_blocks_in_use == 0
    assert all(len(d.tokens_of("r", i)) == 4 for i in range(4))


def test_fork_of_a_block_aligned_prompt():
    sched = make_scheduler()
    d = Driver(sched)
    sched.add_request(request("r", list(range(1, 9)), n=2, seed=0, max_tokens=2))
    step, _ = d.step()
    assert chunks(step) == [("r#0", 8, 0, [0, 1])]
    step, _ = d.step()
    assert step.new_sequences[0].block_ids == [0] and step.new_sequences[0].seed == 1
    assert chunks(step) == [("r#0", 1, 2, [2]), ("r#1", 1, 1, [3])]
    assert step.block_copies == [(1, 3)]
    d.run()
    sched.blocks.check_invariants()
    assert sched.blocks.evictable_block_ids() == [1, 0]


def test_samples_of_a_cached_prompt_share_the_hit_blocks():
    sched = make_scheduler()
    d = Driver(sched)
    prompt = list(range(1, 11))
    sched.add_request(request("a", prompt, max_tokens=1))
    d.run()
    sched.add_request(request("b", prompt, n=2, max_tokens=2))
    step, tokens = d.step()
    assert step.new_sequences[0].block_ids == [0, 1]
    assert chunks(step) == [("b#0", 2, 2, [3])]
    assert tokens.started[0].num_cached_tokens == 8
    assert [sched.blocks.ref_count(b) for b in (0, 1, 3)] == [2, 2, 2]
    d.run()
    assert sched.stats().num_blocks_in_use == 0


def test_preempted_samples_resume_with_their_own_outputs_and_seed():
    sched = make_scheduler(num_blocks=4)
    d = Driver(sched)
    prompt = [1, 2, 3, 4, 5, 6]
    sched.add_request(request("r", prompt, n=2, seed=3, max_tokens=6))
    for _ in range(4):
        d.step()
    assert sched.stats().num_preemptions == 0
    assert [sched.blocks.block_table(f"r#{i}") for i in range(2)] == [[0, 2, 3], [0, 1]]
    step, _ = d.step()  # r#1 needs a third block, none is left: it preempts itself
    assert step.finished_seq_ids == ["r#1"] and chunks(step) == [("r#0", 1, 3, [])]
    assert sched.stats().num_preemptions == 1
    outputs_1 = d.tokens_of("r", 1)
    assert len(outputs_1) == 3
    step, tokens = d.step()
    assert chunks(step) == [("r#0", 1, 3, [])]
    assert tokens.outputs[0].finish_reason == "length"
    step, _ = d.step()
    assert step.finished_seq_ids == ["r#0"]
    assert step.new_sequences == [
        NewSequence(
            seq_id="r#1",
            token_ids=prompt + outputs_1,
            num_prompt_tokens=6,
            num_output_tokens=3,
            block_ids=[0, 1],  # both full blocks are prefix hits
            num_computed_tokens=8,
            sampling=SamplingParams(n=2, seed=3, max_tokens=6),
            seed=4,
        )
    ]
    assert chunks(step) == [("r#1", 1, 2, [3])]
    d.run()
    assert len(d.tokens_of("r", 0)) == 6 and len(d.tokens_of("r", 1)) == 6
    assert sched.stats().num_blocks_in_use == 0


def test_pending_samples_hold_their_seats():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=12)
    d = Driver(sched)
    sched.add_request(request("r", list(range(1, 11)), n=2, max_tokens=2))
    sched.add_request(request("b", [1, 2], max_tokens=1))
    step, _ = d.step()
    assert chunks(step) == [("r#0", 10, 0, [0, 1, 2])]  # b waits: r#1 will take a seat
    step, _ = d.step()
    assert [c.seq_id for c in step.chunks] == ["r#0", "r#1"]
    step, _ = d.step()
    assert [c.seq_id for c in step.chunks] == ["r#1", "b"]
    d.run()
    assert sched.stats().num_blocks_in_use == 0
