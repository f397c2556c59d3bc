"""DecodeContext: which decode steps append, which gather, and that both attend exactly
like the paged reference."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from model_runner.config import EngineConfig
from model_runner.decode_context import DecodeContext
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence, ScheduledChunk, StepInput
from tests.model_runner.test_tiny_models import COMMON

LAYERS, KV_HEADS, HEADS, DIM, BLOCK = 2, 2, 4, 8, 4


def _context(max_bytes: int = 1 << 30, sliding_window: int | None = None) -> DecodeContext:
    return DecodeContext(
        LAYERS, KV_HEADS, DIM, torch.float32, max_bytes=max_bytes, sliding_window=sliding_window
    )


def _plan(ctx: DecodeContext, ids, lens: list[int], tables: list[list[int]], new_tokens=None):
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return ctx.plan(ids, torch.tensor(lens, dtype=torch.int32), table_t, BLOCK, new_tokens)


def _run(ctx: DecodeContext, ids, lens: list[int], tables: list[list[int]], new_tokens=None):
    """Plan a step and commit it (its forward ran)."""
    step = _plan(ctx, ids, lens, tables, new_tokens)
    ctx.commit(step)
    return step


def test_a_continuing_batch_appends_anything_else_gathers():
    ctx = _context()
    first = _run(ctx, ["a", "b"], [5, 3], [[0, 1], [2]])
    assert first is not None and not first.append
    assert first.gather_index.tolist() == [0, 1, 2, 0]  # whole blocks, short rows padded
    assert _run(ctx, ["a", "b"], [6, 4], [[0, 1], [2]]).append
    assert not _run(ctx, ["b", "a"], [5, 7], [[2, 3], [0, 1]]).append  # another order
    ctx.reset()  # a prefill step ran in between
    assert not _run(ctx, ["b", "a"], [6, 8], [[2, 3], [0, 1]]).append
    assert not _run(ctx, ["b"], [7], [[2, 3]]).append  # a row dropped
    assert not _run(ctx, ["b", "a"], [8, 9], [[2, 3], [0, 1]]).append  # a row back
    assert not _run(ctx, ["b", "a"], [10, 10], [[2, 3, 4], [0, 1, 4]]).append  # two tokens


def test_verifying_rows_append_and_the_next_step_starts_after_the_accepted_prefix():
    """Speculation: a row takes K + 1 tokens; once some were rejected, the next step starts
    before the held length and still appends (the accepted positions stay valid)."""
    ctx = _context()
    _run(ctx, ["a", "b"], [6, 4], [[0, 1], [2]])
    verify = _run(ctx, ["a", "b"], [9, 5], [[0, 1, 3], [2, 4]], new_tokens=[3, 1])
    assert verify.append and verify.multi_token
    assert verify.token_rows.tolist() == [0, 0, 0, 1]
    assert verify.token_lens.tolist() == [7, 8, 9, 5]
    assert verify.new_slots.tolist() == [6, 7, 8, ctx.capacity + 4]
    query = torch.zeros(2, HEADS, DIM)
    with pytest.raises(ValueError, match="fused layer only"):
        verify.attend(ctx.buffers[0], query, query, query, ctx.buffers[0], 1.0)
    # "a" kept one of its two proposals (its next token at position 7); "b" had none.
    after = _run(ctx, ["a", "b"], [8, 6], [[0, 1], [2, 4]])
    assert after.append and not after.multi_token
    assert not _run(ctx, ["a", "b"], [10, 7], [[0, 1, 3], [2, 4]]).append  # past the held 8


def test_rows_are_keys_compared_by_identity_when_they_have_no_equality():
    """The runner's rows are its sequence states: a namesake at the right length gathers."""

    class Row:
        pass

    ctx, a, b = _context(), Row(), Row()
    _run(ctx, [a, b], [5, 3], [[0, 1], [2]])
    assert _run(ctx, [a, b], [6, 4], [[0, 1], [2]]).append
    assert not _run(ctx, [a, Row()], [7, 5], [[0, 1], [3, 4]]).append


def test_an_uncommitted_step_leaves_nothing_held():
    ctx = _context()
    _run(ctx, ["a"], [5], [[0, 1]])
    _plan(ctx, ["a"], [6], [[0, 1]])  # its forward failed: no commit
    assert not _plan(ctx, ["a"], [7], [[0, 1]]).append


def test_only_the_step_planned_last_commits():
    ctx = _context()
    stale = _plan(ctx, ["a"], [5], [[0, 1]])
    _plan(ctx, ["a", "b"], [5, 3], [[0, 1], [2]])
    with pytest.raises(ValueError, match="planned last"):
        ctx.commit(stale)
    ctx.reset()
    with pytest.raises(ValueError, match="planned last"):
        ctx.commit(stale)


def test_a_step_needs_one_length_and_block_table_per_row():
    """The overlap bug: three sequences' lengths and tables for a two-row step."""
    ctx = _context()
    with pytest.raises(ValueError, match="2 rows, 3 lengths, 3 block tables"):
        _plan(ctx, ["a", "b"], [6, 4, 1], [[0, 1], [2], [3]])


def test_growing_past_the_capacity_reallocates_and_gathers():
    ctx = _context()
    _run(ctx, ["a"], [126], [list(range(32))])
    assert ctx.capacity == 128
    step = _run(ctx, ["a"], [127], [list(range(32))])
    assert step.append  # 127 tokens still fit in whole blocks of 128 columns
    step = _run(ctx, ["a"], [129], [list(range(33))])
    assert ctx.capacity == 256 and not step.append


def test_over_the_budget_it_steps_aside():
    ctx = _context(max_bytes=ctx_bytes_for(rows=1, capacity=128) - 1)
    assert _plan(ctx, ["a"], [5], [[0, 1]]) is None


def ctx_bytes_for(rows: int, capacity: int) -> int:
    return _context().bytes_for(rows, capacity)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_append_and_gather_attend_like_the_paged_reference(sliding_window):
    torch.manual_seed(0)
    num_blocks = 16
    caches = [
        (
            torch.randn(num_blocks, BLOCK, KV_HEADS, DIM),
            torch.randn(num_blocks, BLOCK, KV_HEADS, DIM),
        )
        for _ in range(LAYERS)
    ]
    tables = [[3, 7, 1], [5, 9]]
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    ctx = _context(sliding_window=sliding_window)
    for lens in ([9, 6], [10, 7], [11, 8]):  # a gather step, then two appends
        step = _plan(ctx, ["a", "b"], lens, tables)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        table_t = torch.tensor([tables[0], tables[1] + [0]], dtype=torch.int32)
        for layer, (k_cache, v_cache) in enumerate(caches):
            key, value = torch.randn(2, KV_HEADS, DIM), torch.randn(2, KV_HEADS, DIM)
            for row, n in enumerate(lens):  # what write_kv does first
                block = tables[row][(n - 1) // BLOCK]
                k_cache[block, (n - 1) % BLOCK], v_cache[block, (n - 1) % BLOCK] = (
                    key[row],
                    value[row],
                )
            query = torch.randn(2, HEADS, DIM)
            buffers = step.buffers[layer]
            got = step.attend(buffers, query, key, value, (k_cache, v_cache), 0.5)
            expected = paged_attention_ref(
                query, k_cache, v_cache, table_t, seq_lens, starts, 0.5,
                sliding_window=sliding_window,
            )  # fmt: skip
            torch.testing.assert_close(got, expected)
        ctx.commit(step)


def _tiny_runner(tmp_path):
    import transformers

    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    config = EngineConfig(
        load_format="dummy", hf_config_path=str(tmp_path), dtype="float32", kv_cache_memory=0.01
    )
    return ModelRunner(config, progress=False)


def test_a_new_sequence_under_a_finished_ones_id_gathers(tmp_path):
    """The runner keys rows by sequence state, not id: "b" finishes and a new "b" (prefix in
    the cache, one token to compute) comes back at exactly the old one's length + 1. Keyed
    by id, its row appended to the old "b"'s context and sampled from the wrong K/V."""
    runner = _tiny_runner(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    modes, real_plan = [], runner.paths.decode_context.plan

    def plan(*args):
        step = real_plan(*args)
        modes.append(step.append)
        return step

    runner.paths.decode_context.plan = plan

    def new(seq_id, tokens, blocks, computed=0):
        return NewSequence(
            seq_id=seq_id,
            token_ids=tokens,
            num_prompt_tokens=len(tokens),
            block_ids=blocks,
            num_computed_tokens=computed,
            sampling=params,
        )

    def chunk(seq_id, num_tokens=1):
        return ScheduledChunk(seq_id, num_tokens, 1, [])

    a, b, r = [5, 17, 99, 3, 42, 8, 64, 1, 2, 77], [7, 7, 7, 7, 7], [100, 3, 50, 23, 14, 9, 33]
    prefill = [new("a", a, [1]), new("b", b, [2]), new("t", r, [3])]
    runner.execute(
        StepInput(
            step_id=0, new_sequences=prefill, chunks=[chunk("a", 10), chunk("b", 5), chunk("t", 7)]
        )
    )
    decode = [chunk("a"), chunk("b")]
    runner.execute(StepInput(step_id=1, chunks=decode, finished_seq_ids=["t"]))  # gathers
    # "b" again: r's first 6 tokens computed (t's block), 7 = the old "b"'s 6 + 1
    again = new("b", r, [3], computed=6)
    got = runner.execute(
        StepInput(step_id=2, new_sequences=[again], chunks=decode, finished_seq_ids=["b"])
    )
    runner.execute(StepInput(step_id=3, chunks=decode))  # a true continuation appends
    alone = runner.execute(
        StepInput(
            step_id=4,
            new_sequences=[new("r", r, [4])],
            chunks=[chunk("r", 7)],
            finished_seq_ids=["a", "b"],
        )
    )
    assert modes == [False, False, True]
    (ours,), (ref,) = [t for t in got.sampled if t.seq_id == "b"], alone.sampled
    assert ours.token_id == ref.token_id
    assert [t for t, _ in ours.top_logprobs] == [t for t, _ in ref.top_logprobs]
    for (_, x), (_, y) in zip(ours.top_logprobs, ref.top_logprobs, strict=True):
        assert abs(x - y) < 1e-4
    runner.execute(StepInput(step_id=5, finished_seq_ids=["r"]))
