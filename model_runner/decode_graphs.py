"""Decode steps replayed from captured graphs, one per batch-size bucket (CUDA graphs).

A decode step of B rows (every row one query token) runs in the graph of the smallest
bucket >= B. Every graph reads the same static, max-sized input buffers (token ids,
positions, slot mapping, block tables, context lengths) through views of its first
`bucket` rows and writes its logits into a tensor owned by the graph; a step copies its
inputs into those buffers, pads rows B..bucket, replays, and reads logits[:B]. Nothing is
reallocated between replays.

Padding rows are one-token sequences whose K/V go to the reserved dummy block (the KV
cache's last block, which the scheduler never hands out); their logits are ignored.

NOTE: what the graph closes over is fixed at capture: the batch shape, `max_query_len` 1
and `max_seq_len` = max_model_len (host-side bounds only: the Triton kernels read the
context lengths from the device buffers; `max_seq_len` fixes the split-KV count per
bucket). Capture itself is behind `Capturer`, so the CPU tests run the bucket choice,
padding and buffer reuse with a capturer that replays the Python callable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from model_runner.attention import AttentionMetadata
from model_runner.input_batch import ModelInputs

log = logging.getLogger(__name__)


class Graph(Protocol):
    """A captured step: `replay` recomputes `output` from the static inputs it read."""

    output: torch.Tensor

    def replay(self) -> None: ...


class Capturer(Protocol):
    """Turns a step function of static buffers into a replayable `Graph`."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph: ...


class _CudaGraph:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor):
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapturer:
    """`torch.cuda.CUDAGraph` capture; all graphs share one memory pool (capture the
    largest bucket first, as vLLM does, so the smaller ones reuse its blocks)."""

    def __init__(self, device: torch.device, warmups: int = 2):
        self.device = device
        self.warmups = warmups
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph:
        # NOTE: warm-up runs compile the Triton kernels for this bucket's shapes and set up
        # cuBLAS workspaces outside the capture (neither may happen inside it).
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmups):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        return _CudaGraph(graph, output)


class _ReplayedCallable:
    def __init__(self, fn: Callable[[], torch.Tensor], counter: EagerCapturer):
        self.fn, self.counter = fn, counter
        self.output = fn().clone()

    def replay(self) -> None:
        self.counter.replays += 1
        self.output.copy_(self.fn())


class EagerCapturer:
    """The CPU stand-in for CUDA graphs: `replay` reruns the callable on the same static
    buffers and copies its result into the output tensor made at capture (as a graph
    writes into its own). Counts captures and replays, for tests."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph:
        self.captures += 1
        return _ReplayedCallable(fn, self)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's decode buckets 1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    """Captured decode steps of one model over its KV cache (see the module)."""

    def __init__(
        self,
        model,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        buckets: list[int],
        max_model_len: int,
        block_size: int,
        dummy_block: int,
        capturer: Capturer,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = sorted(buckets)
        self.max_model_len = max_model_len
        self.dummy_block = dummy_block
        self.dummy_slot = dummy_block * block_size
        self.capturer = capturer
        rows, device = self.buckets[-1], kv_caches[0][0].device
        self.max_blocks = -(-max_model_len // block_size)

        def ints(n: int, fill: int, dtype=torch.int32, *more: int) -> torch.Tensor:
            return torch.full((n, *more), fill, dtype=dtype, device=device)

        # NOTE: the static inputs, allocated once; every bucket's graph reads views of them.
        self.input_ids = ints(rows, 0, torch.long)
        self.positions = ints(rows, 0, torch.long)
        self.slot_mapping = ints(rows, self.dummy_slot, torch.long)
        self.block_tables = ints(rows, dummy_block, torch.int32, self.max_blocks)
        self.seq_lens = ints(rows, 1)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(rows, dtype=torch.long, device=device)
        self.graphs: dict[int, Graph] = {}

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first; logs the time it took (one INFO line)."""
        start = time.perf_counter()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                self.graphs[bucket] = self.capturer.capture(lambda b=bucket: self._forward(b))
        log.info(
            "decode graphs captured for %d batch sizes (1..%d) in %.1f s",
            len(self.buckets), self.max_rows, time.perf_counter() - start,
        )  # fmt: skip

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            all_slots_valid=True,  # NOTE: padding rows write the dummy slot, never -1
        )
        ids, pos = self.input_ids[:bucket], self.positions[:bucket]
        return self.model(ids, pos, self.kv_caches, meta, self.logits_indices[:bucket])

    def bucket_for(self, rows: int) -> int | None:
        """The smallest bucket that holds `rows`, None past the largest."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        return None

    def applies(self, inputs: ModelInputs) -> bool:
        """A decode-only step (one query token per row, every row sampled) that fits."""
        meta, rows = inputs.meta, inputs.input_ids.shape[0]
        return (
            meta.max_query_len == 1
            and meta.per_sequence is None
            and len(inputs.sample_seqs) == rows
            and rows <= self.max_rows
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    @torch.inference_mode()
    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """The step's float32 logits [B, vocab]: a view of the bucket graph's output."""
        rows = inputs.input_ids.shape[0]
        bucket = self.bucket_for(rows)
        meta = inputs.meta
        self.input_ids[:rows].copy_(inputs.input_ids)
        self.positions[:rows].copy_(inputs.positions)
        self.slot_mapping[:rows].copy_(meta.slot_mapping)
        self.seq_lens[:rows].copy_(meta.seq_lens)
        # NOTE: columns past a row's blocks keep earlier (valid) block ids: never attended.
        self.block_tables[:rows, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if bucket > rows:
            self.input_ids[rows:bucket].zero_()
            self.positions[rows:bucket].zero_()
            self.slot_mapping[rows:bucket].fill_(self.dummy_slot)
            self.seq_lens[rows:bucket].fill_(1)
            self.block_tables[rows:bucket].fill_(self.dummy_block)
        graph = self.graphs[bucket]
        graph.replay()
        return graph.output[:rows]
