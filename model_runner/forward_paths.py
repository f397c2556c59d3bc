"""How a step's forward runs: the fastest path that serves it.

- A CUDA graph: decode steps that fit a captured bucket (model_runner/decode_graphs.py).
- On the CPU, decode-only steps attend over the DecodeContext's contiguous copy of each
  sequence's K/V (model_runner/decode_context.py), through the fused C++ decode layers
  (model_runner/fused_decode.py), else the compiled ones (model_runner/compiled_decode.py),
  else eagerly. Rows verifying speculative tokens attend in the fused layers only.
- Else the eager forward over the paged cache; always with adapter rows (graphs and the
  fused or compiled layers have no LoRA).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kernels import ops
from model_runner.attention import AttentionMetadata
from model_runner.compiled_decode import CompiledDecode
from model_runner.config import EngineConfig
from model_runner.decode_context import DecodeContext
from model_runner.decode_graphs import Capturer, CudaGraphCapturer, DecodeGraphs, bucket_sizes
from model_runner.fault_injection import ForwardFaults
from model_runner.fused_decode import FusedDecode
from model_runner.input_batch import ModelInputs, SequenceState
from model_runner.kv_cache import KVCache, bytes_per_block
from model_runner.step_input import StepInput

log = logging.getLogger(__name__)


def make_decode_context(
    config: EngineConfig, mc, dtype: torch.dtype, kv_dtype: torch.dtype, device, cache_bytes: int
) -> DecodeContext | None:
    """CPU references only (Triton attends in the paged cache); budget: half the cache.

    None in batch-invariant mode: its one attention call over the whole batch blocks by
    the longest context, so a row's result would depend on the others.
    """
    if ops.use_triton(torch.empty(0, device=device)) or config.batch_invariant:
        return None
    if kv_dtype != dtype:  # an FP8 cache: attention reads the paged blocks
        return None
    return DecodeContext(
        mc.num_layers,
        mc.num_kv_heads,
        mc.head_dim,
        dtype,
        max_bytes=cache_bytes // 2,
        sliding_window=mc.sliding_window,
    )


class ForwardPaths:
    """The decode context, the CPU's fused or compiled decode layers, and CUDA graphs of
    one runner's model; `forward` picks among them per step (see the module)."""

    def __init__(
        self,
        model,
        kv_cache: KVCache,
        decode_context: DecodeContext | None,
        compiled: FusedDecode | CompiledDecode | None,
        block_size: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.decode_context = decode_context
        self.compiled = compiled
        self.graphs: DecodeGraphs | None = None
        self.block_size = block_size

    @classmethod
    def create(cls, runner) -> ForwardPaths:
        """The paths for a loaded runner (its model, KV cache, plan and config)."""
        config, mc = runner.config, runner.rank_model_config
        cache_bytes = runner.num_blocks * bytes_per_block(mc, runner.block_size, runner.dtype)
        ctx = make_decode_context(
            config, mc, runner.dtype, runner.kv_dtype, runner.device, cache_bytes
        )
        compiled = None
        if not runner.tp.enabled:  # CPU decode steps of a few rows: fused, else compiled
            compiled = FusedDecode.create(
                runner.model, runner.linear_plan, config, runner.dtype, ctx is not None
            ) or CompiledDecode.create(runner.model, runner.linear_plan, config, ctx is not None)
        if isinstance(compiled, CompiledDecode):
            compiled.warm_up()
        paths = cls(runner.model, runner.kv_cache, ctx, compiled, runner.block_size)
        eager = config.enforce_eager or config.batch_invariant or runner.tp.enabled
        if runner.device.type == "cuda" and not eager:
            paths.enable_graphs(
                CudaGraphCapturer(runner.device), config.max_num_seqs, runner.max_model_len
            )
        return paths

    def enable_graphs(
        self, capturer: Capturer, max_rows: int, max_seq_len: int
    ) -> DecodeGraphs | None:
        """Capture decode steps for the buckets up to `max_rows`; decode steps that fit then
        replay them. `max_seq_len` must bound every context. None (logged) when capture
        fails."""
        graphs = DecodeGraphs(
            self.model,
            self.kv_cache.layers,
            bucket_sizes(max_rows),
            max_seq_len,
            self.block_size,
            self.kv_cache.dummy_block,
            capturer,
        )
        try:
            graphs.capture()
        except Exception as e:  # a step that syncs or allocates oddly: serve eagerly
            log.warning("decode graphs are off (capture failed: %s); steps run eagerly", e)
            return None
        self.graphs = graphs
        return graphs

    @property
    def max_verify_tokens(self) -> int:
        """The most token rows a step with speculative tokens verifies in the fused decode
        layer (above, it runs eagerly: slower than not speculating); 0: no such limit."""
        if isinstance(self.compiled, FusedDecode):
            return self.compiled.max_rows
        return 0

    def forward(
        self,
        step: StepInput,
        inputs: ModelInputs,
        seqs: dict[str, SequenceState],
        faults: ForwardFaults,
        lora=None,
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's logits through the fastest path that serves it (see the module);
        `faults` (tests) may fail it just before the model runs."""
        graphs = self.graphs
        if graphs is not None and (lora_slots is not None or not graphs.applies(inputs)):
            graphs = None
        if graphs is None:
            meta = self._with_decode_context(step, inputs, seqs, may_fuse=lora_slots is None)
        else:
            meta = inputs.meta
            if self.decode_context is not None:
                self.decode_context.reset()
        faults.check()
        args = (inputs.input_ids, inputs.positions, self.kv_cache.layers, meta,
                inputs.logits_indices)  # fmt: skip
        rows = inputs.input_ids.shape[0]  # NOTE: the rows the forward runs, sampled or not
        if graphs is not None:
            logits = graphs.run(inputs)
        elif lora_slots is not None:
            lora.context.set(lora_slots)
            try:
                logits = self.model(*args)
            finally:
                lora.context.set(None)
        elif self.compiled is not None and self.compiled.applies(meta, rows):
            logits = self.compiled.run(*args)
        else:
            logits = self.model(*args)
        if meta.decode_context is not None:
            self.decode_context.commit(meta.decode_context)
        return logits

    def _with_decode_context(
        self,
        step: StepInput,
        inputs: ModelInputs,
        seqs: dict[str, SequenceState],
        may_fuse: bool,
    ) -> AttentionMetadata:
        """Decode-only steps without block copies attend over the DecodeContext (CPU).

        NOTE: `step` is the step that executes (placeholder rows already dropped): every
        chunk must be one new token, or (`may_fuse`, the fused C++ layer) one plus its
        speculative tokens. Its rows are the runner's sequence states,
        so a sequence re-sent (preemption) or a new one under a finished one's id gathers.
        """
        meta, ctx = inputs.meta, self.decode_context
        if ctx is None:
            return meta
        new_tokens = [1 + len(c.draft_token_ids) if c.num_tokens == 1 else 0 for c in step.chunks]
        decode_only = 0 not in new_tokens and sum(new_tokens) == inputs.input_ids.shape[0]
        # NOTE: verifying rows (several tokens) attend in the fused C++ layer only.
        fused = may_fuse and self.max_verify_tokens >= sum(new_tokens)
        if not decode_only or step.block_copies or (max(new_tokens) > 1 and not fused):
            ctx.reset()
            return meta
        rows = [seqs[chunk.seq_id] for chunk in step.chunks]
        plan = ctx.plan(rows, meta.seq_lens, meta.block_tables, self.block_size, new_tokens)
        if plan is None:
            return meta
        return dataclasses.replace(meta, decode_context=plan)
