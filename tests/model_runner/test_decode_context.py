"""DecodeContext: which decode steps append, which gather, and that both attend exactly
like the paged reference."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from model_runner.decode_context import DecodeContext

LAYERS, KV_HEADS, HEADS, DIM, BLOCK = 2, 2, 4, 8, 4


def _context(max_bytes: int = 1 << 30, sliding_window: int | None = None) -> DecodeContext:
    return DecodeContext(
        LAYERS, KV_HEADS, DIM, torch.float32, max_bytes=max_bytes, sliding_window=sliding_window
    )


def _plan(ctx: DecodeContext, ids: list[str], lens: list[int], tables: list[list[int]]):
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return ctx.plan(ids, torch.tensor(lens, dtype=torch.int32), table_t, BLOCK)


def test_a_continuing_batch_appends_anything_else_gathers():
    ctx = _context()
    first = _plan(ctx, ["a", "b"], [5, 3], [[0, 1], [2]])
    assert first is not None and not first.append
    assert first.gather_index.tolist() == [0, 1, 2, 0]  # whole blocks, short rows padded
    ctx.commit()
    assert _plan(ctx, ["a", "b"], [6, 4], [[0, 1], [2]]).append
    ctx.commit()
    assert not _plan(ctx, ["b", "a"], [5, 7], [[2, 3], [0, 1]]).append  # another order
    ctx.commit()
    ctx.reset()  # a prefill step ran in between
    assert not _plan(ctx, ["b", "a"], [6, 8], [[2, 3], [0, 1]]).append


def test_an_uncommitted_step_leaves_nothing_held():
    ctx = _context()
    _plan(ctx, ["a"], [5], [[0, 1]])
    ctx.commit()
    _plan(ctx, ["a"], [6], [[0, 1]])  # its forward failed: no commit
    assert not _plan(ctx, ["a"], [7], [[0, 1]]).append


def test_growing_past_the_capacity_reallocates_and_gathers():
    ctx = _context()
    _plan(ctx, ["a"], [126], [list(range(32))])
    ctx.commit()
    assert ctx.capacity == 128
    step = _plan(ctx, ["a"], [127], [list(range(32))])
    assert step.append  # 127 tokens still fit in whole blocks of 128 columns
    ctx.commit()
    step = _plan(ctx, ["a"], [129], [list(range(33))])
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
        ctx.commit()
