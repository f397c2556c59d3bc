"""The model runner: owns the model, the KV cache and every sequence's state; runs steps."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch

from model_runner.attention import AttentionMetadata
from model_runner.config import (
    EngineConfig,
    EngineConfigError,
    resolve_device,
    resolve_dtype_with_reason,
    resolve_max_model_len,
)
from model_runner.draft_model import DraftModel, draft_rejection, resolve_draft
from model_runner.fault_injection import ForwardFaults
from model_runner.forward_paths import ForwardPaths
from model_runner.gguf_loader import check_gguf_tensor_types, load_model_config, open_gguf
from model_runner.grammar import SequenceGrammar
from model_runner.grammar_cache import GrammarCache, hf_tokenizer_info
from model_runner.input_batch import (
    ModelInputs,
    SequenceState,
    apply_state_updates,
    build_model_inputs,
)
from model_runner.kv_cache import (
    KVCache,
    bytes_per_block,
    check_fits_in_memory,
    kv_cache_summary,
    num_blocks_for_cpu,
    num_blocks_for_cuda,
    resolve_kv_cache_dtype,
)
from model_runner.linear_plan import check_quantization, plan_linears
from model_runner.loader import available_memory_bytes, check_kv_scales, load_model
from model_runner.lora import make_lora_slots
from model_runner.lora_adapter import LoraAdapterError
from model_runner.model_source import load_tokenizer, resolve_model
from model_runner.parallel import (
    RankPlacement,
    check_tensor_parallel_config,
    check_tensor_parallel_shape,
    init_tensor_parallel,
    rank_device,
    rank_model_config,
)
from model_runner.placeholders import LastSampled, fill_placeholders
from model_runner.quant.checkpoint_quant import read_checkpoint_quant
from model_runner.rejection_sampler import DraftRejection
from model_runner.sampled_rows import SampledRows
from model_runner.sampler import Sampler
from model_runner.step_flight import LaunchedStep, collect, distinct_states
from model_runner.step_input import NewSequence, StepInput, StepOutput
from model_runner.step_timer import StepClock, StepTimer
from model_runner.step_upload import to_host

log = logging.getLogger(__name__)


class ModelRunner:
    """Loads the model (with a progress bar), allocates the KV cache, executes steps.

    NOT thread-safe: one `launch`, `flush` or `execute` at a time.

    Tensor parallel (`placement.world_size` > 1): every rank runs every step, in the same
    order, on its shard of the model and of the KV cache (the block table is the same for
    all); rank 0 samples and the other ranks learn its tokens by a broadcast. Those steps
    run eagerly (no fused or compiled CPU decode layers, no CUDA graphs).
    """

    def __init__(
        self, config: EngineConfig, progress: bool = True, placement: RankPlacement | None = None
    ):
        self.config = config
        self.placement = placement or RankPlacement(world_size=config.tensor_parallel_size)
        self.device = rank_device(resolve_device(config), self.placement)
        self.step_timer = StepTimer(self.device)
        self.faults = ForwardFaults()
        reader, gguf_types, checkpoint = self._check_before_loading()
        self.dtype, auto_dtype_reason = resolve_dtype_with_reason(config, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config, self.dtype, self.device)
        self._resolve_draft()
        self.tp = init_tensor_parallel(self.placement, self.device, config.collective_timeout)
        # NOTE: this rank's heads: the KV cache and decode context hold only them.
        self.rank_model_config = rank_model_config(self.model_config, self.tp)
        self.block_size = config.block_size
        self.vocab_size = self.model_config.vocab_size
        self.eos_token_ids = list(self.model_config.eos_token_ids)
        if not self._kv_cache_needs_profile():
            self.num_blocks = self._kv_blocks_from_budget()
        if auto_dtype_reason is not None:
            log.info("%s", auto_dtype_reason)
        self.linear_plan = plan_linears(
            dataclasses.replace(config, quantization="none") if self.tp.enabled else config,
            self.device,
            self.dtype,
            self.source.format,
            gguf_types,
            self.model_config,
            available_memory_bytes(),
            checkpoint,
        )
        if self.tp.enabled:
            self.linear_plan = dataclasses.replace(self.linear_plan, tp=self.tp)
        self._load_weights_and_cache(reader, progress)
        self.lora = make_lora_slots(config, self.model.layers, self.dtype, self.device)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, config.seed)
        self._seqs: dict[str, SequenceState] = {}
        self.last_sampled = LastSampled()  # overlap: the previous step's tokens, on the device
        self._in_flight: LaunchedStep | None = None  # the step launched last, until collected
        self._done: list[StepOutput] = []
        self.on_output: Callable[[StepOutput], None] = self._done.append
        self.collect_after_forward = self.device.type == "cuda"
        self.paths = ForwardPaths.create(self)
        source, vocab, eos = self.source, self.vocab_size, self.eos_token_ids
        self.grammars = GrammarCache(
            lambda: hf_tokenizer_info(load_tokenizer(source), vocab, eos),
            max_bytes=config.grammar_cache_mib * 1024 * 1024,
        )

    def _check_before_loading(self):
        """The model's source, config and max_model_len, and every start-up check that needs
        no weights: they run before the weights load (seconds to minutes) and before anything
        is logged, so a refused start prints only its reason. Returns (the GGUF reader or
        None, the GGUF's tensor types, the checkpoint's quantization)."""
        config = self.config
        self.source = resolve_model(config)
        self.model_name = self.source.name
        reader = open_gguf(self.source.path) if self.source.format == "gguf" else None
        self.model_config = load_model_config(self.source, reader)
        self.max_model_len = resolve_max_model_len(
            config, self.model_config.max_position_embeddings
        )
        gguf_types = {t.tensor_type.name for t in reader.tensors} if reader is not None else set()
        check_gguf_tensor_types(gguf_types)
        check_tensor_parallel_config(config, self.device)
        checkpoint = read_checkpoint_quant(self.source.config_path)
        check_quantization(config.quantization, self.device, self.source.format, checkpoint,
                           config.tensor_parallel_size)  # fmt: skip
        check_tensor_parallel_shape(self.model_config, self.placement.world_size)
        return reader, gguf_types, checkpoint

    def _resolve_draft(self) -> None:
        """A draft model's source and config (checked now); its K/V share each block."""
        spec = self.config.speculative_config
        self.draft: DraftModel | None = None
        self.draft_source = None
        self.draft_block_bytes = 0
        if spec is None or spec.method != "draft_model":
            return
        self.draft_source = resolve_draft(self.config, self.model_config, self.source)
        self.draft_block_bytes = bytes_per_block(
            self.draft_source[1], self.config.block_size, self.dtype
        )

    def _load_weights_and_cache(self, reader, progress: bool) -> None:
        """The weights, then (CUDA: after a profiling forward) the KV cache tensors."""
        try:
            self.model = load_model(
                self.source,
                self.model_config,
                self.linear_plan,
                self.max_model_len,
                seed=self.config.seed,
                progress=progress,
                gguf_reader=reader,
            )
            if self.draft_source is not None:
                self.draft = DraftModel(
                    self.config, *self.draft_source, self.dtype, self.device,
                    self.max_model_len, progress,
                )  # fmt: skip
            if self.kv_dtype == torch.float8_e4m3fn:
                check_kv_scales(self.model)
            self.tp.wait_for_all_ranks("loaded")
            if self._kv_cache_needs_profile():
                self._profile_run()
                self.num_blocks = self._kv_blocks_from_budget()
            self.kv_cache = KVCache(
                self.rank_model_config, self.num_blocks, self.block_size, self.kv_dtype, self.device
            )
            if self.draft is not None:
                self.draft.allocate_cache(self.num_blocks, self.block_size)
            log.info(
                "%s",
                kv_cache_summary(
                    self.num_blocks,
                    self.rank_model_config,
                    self.block_size,
                    self.kv_dtype,
                    self.max_model_len,
                ),
            )
        except torch.OutOfMemoryError as e:  # CUDA: the model or one step is too large
            raise EngineConfigError(
                f"not enough GPU memory for {self.model_name} and a step of "
                f"--max-num-batched-tokens {self.config.max_num_batched_tokens}: use a smaller "
                "model or --quantization, lower --max-num-batched-tokens, or free the GPU"
            ) from e

    def _make_grammar(self, new: NewSequence) -> SequenceGrammar | None:
        """A new sequence's matcher; it replays the outputs of a sequence re-sent after
        preemption. NOTE: the executor compiled (and pinned) the grammar before the request
        was scheduled, so this is a cache hit. Only rank 0 samples, so only it has one."""
        if not self.placement.is_driver:
            return None
        compiled = self.grammars.get(new.sampling.grammar)
        return SequenceGrammar(compiled, new.token_ids[new.num_prompt_tokens :])

    def _kv_cache_needs_profile(self) -> bool:
        """CUDA sizes the cache from what a profiling forward leaves free; else from GiB."""
        return self.device.type == "cuda" and self.config.kv_cache_memory is None

    def _kv_blocks_from_budget(self) -> int:
        """NOTE: per rank (each holds its KV heads' share); the same on every rank."""
        cfg, mc = self.config, self.rank_model_config
        if self.device.type != "cuda":
            extra = self.draft_block_bytes
            blocks = num_blocks_for_cpu(cfg, mc, self.kv_dtype, self.max_model_len, extra)
            check_fits_in_memory(
                blocks, mc, self.block_size, self.kv_dtype, available_memory_bytes(), extra
            )
        else:
            blocks = num_blocks_for_cuda(
                cfg, mc, self.kv_dtype, self.max_model_len, self.device, self.draft_block_bytes
            )
        return self.tp.min_over_ranks(blocks, self.device)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One forward at the largest batch, so that the peak activation memory is known."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        cache = KVCache(
            self.rank_model_config, num_blocks, self.block_size, self.kv_dtype, self.device
        )

        def ints(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=ints([list(range(num_blocks))]),
            seq_lens=ints([num_tokens]),
            query_start_loc=ints([0, num_tokens]),
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        rows = min(self.config.max_num_seqs, num_tokens)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        logits_indices = torch.arange(rows, device=self.device)
        logits = self.model(input_ids, positions, cache.layers, meta, logits_indices)
        torch.softmax(logits, dim=-1).sort(dim=-1)
        torch.cuda.synchronize(self.device)
        del cache, logits
        torch.cuda.empty_cache()

    def _lora_token_slots(self, step: StepInput) -> torch.Tensor | None:
        if self.lora is None:
            return None
        return self.lora.token_slots(
            [
                (self._seqs[c.seq_id].lora_slot, c.num_tokens + len(c.draft_token_ids))
                for c in step.chunks
            ]  # fmt: skip
        )

    def read_lora_adapter(self, key: str, path: str) -> None:
        """Read and check an adapter into the host cache (raises LoraAdapterError)."""
        if self.lora is None:
            raise LoraAdapterError("LoRA adapters need --enable-lora")
        self.lora.read(key, path)

    def _forward(self, step: StepInput, inputs: ModelInputs) -> torch.Tensor:
        """The step's logits (model_runner/forward_paths.py picks the path)."""
        lora_slots = self._lora_token_slots(step)
        return self.paths.forward(step, inputs, self._seqs, self.faults, self.lora, lora_slots)

    @property
    def max_verify_tokens(self) -> int:
        """See ForwardPaths.max_verify_tokens."""
        return self.paths.max_verify_tokens

    @property
    def num_active_sequences(self) -> int:
        return len(self._seqs)

    def execute(self, step: StepInput) -> StepOutput:
        """Launch the step and wait for its output (with `on_output` left as it is)."""
        self.launch(step)
        self.flush()
        output = self._done[-1]
        self._done.clear()  # NOTE: cleared, not replaced: `on_output` appends to this list
        return output

    def launch(self, step: StepInput) -> None:
        """Apply the step's state changes, queue its forward and sampling on the device, and
        collect the step launched before it (its output goes to `on_output`). The new step
        stays in flight until the next launch or `flush()`.

        NOTE: on CUDA the previous step is collected once this step's forward is queued, so
        the device has work while the host waits for the previous tokens; on the CPU, where
        the forward runs in the call, first. If this raises, a step still in flight is kept
        for `flush()`; CollectFailed names a previous step that failed in its collect.
        """
        start = time.perf_counter()
        clock = self.step_timer.start()
        step, prev_rows, prev_tokens = self.last_sampled.take(step)
        apply_state_updates(self._seqs, step, self._make_grammar)
        self.kv_cache.copy_blocks(step.block_copies)
        if self.draft is not None:
            self.draft.kv_cache.copy_blocks(step.block_copies)
        for load in step.lora_loads:
            self.lora.load(load.slot, load.key, load.path)
        if not self.collect_after_forward:
            self._collect_in_flight(clock)  # NOTE: then the call after the forward finds none
        rows, seqs, draft_q = None, [], {}
        with torch.inference_mode():
            if step.chunks and self.draft is not None:  # NOTE: fills the draft slots
                step, draft_q = self.draft.propose(step, self._seqs, prev_rows, prev_tokens)
            if step.chunks:
                inputs = build_model_inputs(
                    self._seqs, step, self.block_size, self.device, self.config.batch_invariant
                )
                fill_placeholders(inputs.input_ids, step, prev_rows, prev_tokens)
                logits = self._forward(step, inputs)
            self._collect_in_flight(clock)
            spec = accepted = None
            if step.chunks:
                rejection = draft_rejection(inputs.spec, draft_q)
                sampled = self._sample(logits, inputs.sample_seqs, rejection)
                spec = inputs.spec
                if spec is not None:
                    accepted = to_host(spec.verify(sampled.tokens))
                seqs = [getattr(row, "seq", row) for row in inputs.sample_seqs]  # the states
                self.last_sampled.record(
                    step.step_id,
                    [None if row is not seq else seq.seq_id
                     for row, seq in zip(inputs.sample_seqs, seqs, strict=True)],
                    sampled.tokens,
                )  # fmt: skip
                rows = sampled.start_copy()
                for seq in distinct_states(seqs):
                    seq.num_pending += 1
        clock.end()
        host_seconds = time.perf_counter() - start - clock.excluded_seconds
        self._in_flight = LaunchedStep(
            step.step_id, rows, seqs, clock, host_seconds, spec, accepted
        )

    def _sample(
        self, logits: torch.Tensor, rows: list, rejection: DraftRejection | None = None
    ) -> SampledRows:
        """The rows' tokens on the device. Tensor parallel: rank 0 samples, the others get its
        tokens by a broadcast (no logprobs there: only rank 0 answers)."""
        if self.placement.is_driver:
            sampled = self.sampler.sample(logits, rows, rejection)
        else:
            sampled = None
        if not self.tp.enabled:
            return sampled
        tokens = self.tp.broadcast_tokens(
            sampled.tokens if sampled is not None else None, len(rows), self.device
        )
        return sampled if sampled is not None else SampledRows([r.seq_id for r in rows], tokens)

    def flush(self) -> None:
        """Collect the step in flight, if any (raises CollectFailed if that fails)."""
        self._collect_in_flight()

    def _collect_in_flight(self, inside: StepClock | None = None) -> None:
        """Hand the step in flight's output to `on_output`; `inside`: the clock of the step
        being launched, whose time leaves this wait out."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        start = time.perf_counter()
        output = collect(flight)
        if inside is not None:
            inside.exclude(time.perf_counter() - start)
        self.on_output(output)
