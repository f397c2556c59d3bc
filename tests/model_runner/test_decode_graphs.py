"""Decode graphs on the CPU: bucket choice, padding, static buffer reuse, eager equality.

`EagerCapturer` stands in for CUDA graph capture (it replays the captured callable on the
same static buffers), so everything but the capture itself runs here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from model_runner.attention import AttentionMetadata
from model_runner.decode_graphs import DecodeGraphs, EagerCapturer, bucket_sizes
from model_runner.input_batch import ModelInputs
from model_runner.sampling_params import SamplingParams
from tests.model_runner.driver import generate

BLOCK = 4
DUMMY_BLOCK = 9


def test_bucket_sizes_follow_vllm_and_end_at_max_num_seqs():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    sizes = bucket_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35


def echo_model(input_ids, positions, kv_caches, meta, logits_indices):
    """Logits that show what each row read: ids, positions, slots, lengths, first block."""
    columns = [input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables[:, 0]]
    return torch.stack([c.float() for c in columns], dim=1)[logits_indices]


def decode_inputs(rows: int, step: int) -> ModelInputs:
    ids = torch.arange(rows) + 100 * step
    lens = torch.arange(rows, dtype=torch.int32) + 3 + step
    tables = (torch.arange(rows * 2, dtype=torch.int32).view(rows, 2) + step) % DUMMY_BLOCK
    meta = AttentionMetadata(
        slot_mapping=tables[:, 0].long() * BLOCK + 1,
        block_tables=tables,
        seq_lens=lens,
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=int(lens.max()),
    )
    return ModelInputs(ids, lens.long() - 1, meta, torch.arange(rows), [None] * rows)


def make_graphs(max_rows=8):
    cache = torch.zeros(DUMMY_BLOCK + 1, BLOCK, 1, 2)
    capturer = EagerCapturer()
    graphs = DecodeGraphs(
        echo_model, [(cache, cache)], bucket_sizes(max_rows), 32, BLOCK, DUMMY_BLOCK, capturer
    )
    graphs.capture()
    return graphs, capturer


def test_each_batch_runs_in_the_smallest_bucket_padded_with_the_dummy_slot(caplog):
    with caplog.at_level(logging.INFO, logger="model_runner.decode_graphs"):
        graphs, capturer = make_graphs()
    assert capturer.captures == 4 and sorted(graphs.graphs) == [1, 2, 4, 8]
    assert any("decode graphs captured for 4 batch sizes" in r.message for r in caplog.records)
    expected_bucket = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8}
    for step, rows in enumerate([8, 5, 3, 1, 2, 4, 8, 3]):
        bucket = graphs.bucket_for(rows)
        assert bucket == expected_bucket[rows]
        inputs = decode_inputs(rows, step)
        assert graphs.applies(inputs)
        logits = graphs.run(inputs)
        assert logits.shape == (rows, 5)
        meta = inputs.meta
        want = torch.stack(
            [inputs.input_ids, inputs.positions, meta.slot_mapping, meta.seq_lens,
             meta.block_tables[:, 0]], dim=1,
        ).float()  # fmt: skip
        assert torch.equal(logits, want)
        full = graphs.graphs[bucket].output
        pad = torch.tensor([0.0, 0.0, DUMMY_BLOCK * BLOCK, 1.0, DUMMY_BLOCK])
        assert torch.equal(full[rows:], pad.expand(bucket - rows, 5))
    assert capturer.replays == 8
    assert graphs.bucket_for(9) is None


def test_static_buffers_and_outputs_are_never_reallocated():
    graphs, _ = make_graphs()
    names = ["input_ids", "positions", "slot_mapping", "block_tables", "seq_lens"]
    before = {n: getattr(graphs, n).data_ptr() for n in names}
    outputs = {b: g.output.data_ptr() for b, g in graphs.graphs.items()}
    for step in range(3):
        for rows in (1, 3, 8):
            out = graphs.run(decode_inputs(rows, step))
            assert out.data_ptr() == outputs[graphs.bucket_for(rows)]
    assert {n: getattr(graphs, n).data_ptr() for n in names} == before
    assert {b: g.output.data_ptr() for b, g in graphs.graphs.items()} == outputs


def test_non_decode_steps_do_not_apply():
    graphs, _ = make_graphs(max_rows=4)
    assert not graphs.applies(decode_inputs(5, 0))  # past the largest bucket
    inputs = decode_inputs(2, 0)
    prefill = ModelInputs(
        torch.arange(3),
        torch.arange(3),
        AttentionMetadata(
            slot_mapping=torch.arange(3),
            block_tables=torch.zeros(1, 1, dtype=torch.int32),
            seq_lens=torch.tensor([3], dtype=torch.int32),
            query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
            max_query_len=3,
            max_seq_len=3,
        ),
        torch.tensor([2]),
        [None],
    )
    assert graphs.applies(inputs) and not graphs.applies(prefill)


@pytest.fixture
def graph_runner(runner):
    """The session runner with decode graphs for buckets up to 8 (restored afterwards)."""
    capturer = EagerCapturer()
    graphs = runner.paths.enable_graphs(capturer, max_rows=8, max_seq_len=256)
    assert graphs is not None
    runner.paths.graphs = None
    yield runner, graphs, capturer
    runner.paths.graphs = None


def test_graph_decode_steps_equal_eager_for_every_batch_size(graph_runner, plain_prompts):
    """Greedy tokens over a run of decode steps are bit-identical to eager (float32)."""
    runner, graphs, capturer = graph_runner
    prompts = [ids[:8] for ids in plain_prompts]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for rows in range(1, 9):
        batch = [prompts[i % len(prompts)] for i in range(rows)]
        runner.paths.graphs = None
        eager = generate(runner, batch, params)
        runner.paths.graphs = graphs
        replays = capturer.replays
        graphed = generate(runner, batch, params)
        runner.paths.graphs = None
        assert capturer.replays - replays == params.max_tokens - 1  # every decode step
        assert graphed == eager, f"batch of {rows}"
