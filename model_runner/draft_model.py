"""A draft model's proposals, made by the runner before the target step.

The scheduler plans a speculating decode row with `ScheduledChunk.num_draft_slots` (blocks
for 1 + K positions, no tokens). Before the target's forward the draft runs K times: once
over every chunk of the step (so its cache sees every token the target sees: prefill
chunks, plain decodes and placeholder rows included), which gives each speculating row its
first proposal, then K - 1 one-token steps for the speculating rows. The proposals reach the
host once (one sync; speculating rows step synchronously anyway) and fill the chunks'
`draft_token_ids`, after which the target verifies them as it does n-gram proposals.

NOTE: the draft's paged KV cache has its own tensors but the target's block tables and slot
mapping, so the scheduler's block manager accounts for both (each block's budget holds both
models' bytes). `SequenceState.draft_num_computed` counts the leading positions whose draft
K/V hold: after a verify that accepted all K, the K-th proposal was never fed to the draft,
so the next step feeds it before the new token. Rejected positions are overwritten later,
as in the target's cache. A sequence that ends right after such a verify leaves that one
position without draft K/V in a block the prefix cache may hand on: a later hit proposes
worse there, never wrongly (the target verifies every proposal).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import msgspec
import torch

from model_runner.attention import AttentionMetadata
from model_runner.config import EngineConfig, EngineConfigError, SpeculativeConfig
from model_runner.counter_rng import uniforms
from model_runner.gguf_loader import check_gguf_tensor_types, load_model_config, open_gguf
from model_runner.input_batch import SequenceState
from model_runner.kv_cache import KVCache
from model_runner.linear_plan import plan_linears
from model_runner.loader import available_memory_bytes, load_model
from model_runner.model_source import (
    ModelConfig,
    ModelSource,
    ModelSourceError,
    bundled_config_name,
    load_tokenizer,
    resolve_model,
)
from model_runner.quant.checkpoint_quant import read_checkpoint_quant
from model_runner.rejection_sampler import DRAFT_DRAW, DraftGroup, DraftRejection, processed_probs
from model_runner.sampling_metadata import build_sampling_metadata
from model_runner.sampling_ops import draw, greedy_argmax
from model_runner.speculative import DraftPosition, SpecBatch
from model_runner.step_input import StepInput
from model_runner.step_upload import to_device, upload_ints

log = logging.getLogger(__name__)


def resolve_draft(
    config: EngineConfig, target: ModelConfig, target_source: ModelSource
) -> tuple[ModelSource, ModelConfig]:
    """The draft's source and config, checked before any weights load (EngineConfigError:
    a bad path, another vocabulary or tokenizer than the target's, tensor parallelism)."""
    spec = config.speculative_config
    if config.tensor_parallel_size > 1:
        raise EngineConfigError(
            '--speculative-config method "draft_model" needs --tensor-parallel-size 1'
        )
    try:
        source = resolve_model(_draft_engine_config(config, spec))
        draft = load_model_config(source)
        if source.format == "gguf":
            check_gguf_tensor_types({t.tensor_type.name for t in open_gguf(source.path).tensors})
    except ModelSourceError as e:
        raise EngineConfigError(f"--speculative-config model {spec.model!r}: {e}") from None
    if draft.vocab_size != target.vocab_size:
        raise EngineConfigError(
            f"--speculative-config: the draft model {spec.model!r} has a vocabulary of "
            f"{draft.vocab_size} tokens, the target {target_source.name!r} one of "
            f"{target.vocab_size}: a draft must share the target's tokenizer"
        )
    if not config.skip_tokenizer_init and source.format != "dummy":  # NOTE: random weights
        _check_same_tokenizer(source, target_source, spec.model)  # need only the vocab size
    return source, draft


def _draft_engine_config(config: EngineConfig, spec: SpeculativeConfig) -> EngineConfig:
    """The engine config that resolves the draft as `resolve_model` resolves a target: a
    .json file or bundled config name loads random weights from that config."""
    path = Path(spec.model).expanduser()
    as_config = (path.suffix == ".json" and path.is_file()) or (
        not path.exists() and bundled_config_name(spec.model) is not None
    )
    if as_config:
        return dataclasses.replace(
            config, model=None, load_format="dummy", hf_config_path=spec.model,
            served_model_name=None,
        )  # fmt: skip
    return dataclasses.replace(
        config, model=spec.model, load_format=spec.load_format, hf_config_path=None,
        served_model_name=None,
    )  # fmt: skip


def _check_same_tokenizer(draft: ModelSource, target: ModelSource, name: str) -> None:
    """Tokenizers from other files must map every token alike (loaded only then)."""
    if draft.tokenizer_path.resolve() == target.tokenizer_path.resolve():
        return
    try:
        draft_vocab = load_tokenizer(draft).get_vocab()
        target_vocab = load_tokenizer(target).get_vocab()
    except (OSError, ValueError) as e:
        log.warning("draft tokenizer not compared with the target's (%s)", e)
        return
    if draft_vocab != target_vocab:
        raise EngineConfigError(
            f"--speculative-config: the draft model {name!r} has another tokenizer than the "
            f"target {target.name!r}: a draft must share the target's tokenizer"
        )


class DraftModel:
    """The draft's weights and paged KV cache; `propose` fills a step's draft slots."""

    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        model_config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        progress: bool = True,
    ) -> None:
        self.source, self.model_config, self.device = source, model_config, device
        gguf_types: set[str] = set()
        reader = None
        if source.format == "gguf":
            reader = open_gguf(source.path)
            gguf_types = {t.tensor_type.name for t in reader.tensors}
        plan = plan_linears(
            config, device, dtype, source.format, gguf_types, model_config,
            available_memory_bytes(), read_checkpoint_quant(source.config_path),
        )  # fmt: skip
        self.model = load_model(
            source, model_config, plan, max_model_len, seed=config.seed + 1,
            progress=progress, gguf_reader=reader,
        )  # fmt: skip
        self.dtype = dtype
        self.seed = config.seed + 1  # NOTE: unseeded rows' proposal draws, apart from the target's
        self._step = 0
        self.kv_cache: KVCache | None = None
        log.info(
            "draft model %s: %d layers, hidden size %d (%s)",
            source.name if source.format != "dummy" else source.config_path,
            model_config.num_layers, model_config.hidden_size, source.format,
        )  # fmt: skip

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv_cache = KVCache(self.model_config, num_blocks, block_size, self.dtype, self.device)

    @torch.inference_mode()
    def propose(
        self,
        step: StepInput,
        seqs: dict[str, SequenceState],
        prev_rows: dict[str, int],
        prev_tokens: torch.Tensor | None,
    ) -> tuple[StepInput, dict[str, torch.Tensor]]:
        """`step` with every draft slot filled, and the draft distributions [K, V] of the
        sampled (not greedy) speculating rows, by sequence id, for the rejection rule."""
        batch, rows = step_batch(step, seqs, prev_rows, self.block_size)
        logits = self._forward(batch, prev_tokens, None)
        if not rows:
            return step, {}
        proposals: list[list[torch.Tensor]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for j in range(max(k for _, k in rows)):
            active = [i for i, (_, k) in enumerate(rows) if k > j]
            tokens, q = self._choose(logits, [(rows[i][0], j) for i in active])
            for n, i in enumerate(active):
                proposals[i].append(tokens[n])
                if q is not None and q[n] is not None:
                    probs[i].append(q[n])
            ongoing = [n for n, i in enumerate(active) if rows[i][1] > j + 1]
            if ongoing:
                logits = self._feed_proposals(
                    [rows[active[n]][0] for n in ongoing], j, tokens[ongoing]
                )
        # NOTE: the proposals' one trip to the host (the target's inputs need them)
        flat = torch.stack([t for row in proposals for t in row]).tolist()
        by_seq, at = {}, 0
        for seq, k in rows:
            by_seq[seq.seq_id] = flat[at : at + k]
            at += k
        chunks = [
            msgspec.structs.replace(c, draft_token_ids=by_seq[c.seq_id])
            if c.num_draft_slots else c for c in step.chunks
        ]  # fmt: skip
        q_by_seq = {
            seq.seq_id: torch.stack(p) for (seq, _), p in zip(rows, probs, strict=True) if p
        }
        return msgspec.structs.replace(step, chunks=chunks), q_by_seq

    def _forward(
        self, batch: _DraftBatch, prev_tokens: torch.Tensor | None, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """The draft's logits at the batch's sampled rows (`tokens`: input ids already on
        the device; placeholder rows take the previous step's samples, `prev_tokens`)."""
        input_ids, positions, meta, logits_indices = batch.upload(self.device)
        if tokens is not None:
            input_ids = tokens
        if batch.placeholder_rows:
            src = to_device(batch.placeholder_src, torch.long, self.device)
            input_ids[to_device(batch.placeholder_rows, torch.long, self.device)] = prev_tokens[src]
        return self.model(input_ids, positions, self.kv_cache.layers, meta, logits_indices)

    def _feed_proposals(
        self, seqs: list[SequenceState], j: int, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Feed proposal j of each row (position num_computed + 1 + j); its next logits."""
        batch = _DraftBatch(self.block_size)
        for seq in seqs:
            batch.add(seq, seq.num_computed + 1 + j, [0])
            batch.sample_last()
            seq.draft_num_computed = seq.num_computed + 2 + j
        return self._forward(batch, None, tokens)

    def _choose(
        self, logits: torch.Tensor, rows: list[tuple[SequenceState, int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """Proposal j of each (row, j): the draft's argmax on greedy rows, else a draw from
        q (its distribution under the row's temperature, min_p, top-k and top-p)."""
        tokens = greedy_argmax(logits)
        sampled = [n for n, (seq, _) in enumerate(rows) if not seq.sampling.greedy]
        if not sampled:
            return tokens, None
        positions = [DraftPosition(rows[n][0], [0] * rows[n][1]) for n in sampled]
        meta = build_sampling_metadata(
            positions, logits.shape[-1], logits.device, self.seed, self._step
        )
        self._step += 1
        index = to_device(sampled, torch.long, logits.device)
        scaled = logits[index] / meta.temperature[:, None]
        q = processed_probs(scaled, meta)
        tokens[index] = draw(q, uniforms(meta.keys, torch.full_like(meta.keys, DRAFT_DRAW)))
        per_row: list[torch.Tensor | None] = [None] * len(rows)
        for n, row in enumerate(sampled):
            per_row[row] = q[n]
        return tokens, per_row


def draft_rejection(
    spec: SpecBatch | None, q_by_seq: dict[str, torch.Tensor]
) -> DraftRejection | None:
    """The rejection rule's input for the step's sampled speculating rows (None: none)."""
    if spec is None or not q_by_seq:
        return None
    groups = [g for g in spec.groups if g.seq.seq_id in q_by_seq]
    k = max(len(g.drafts) for g in groups)
    vocab = next(iter(q_by_seq.values())).shape[-1]
    device = next(iter(q_by_seq.values())).device
    probs = torch.zeros(len(groups), k, vocab, device=device)
    for i, g in enumerate(groups):
        q = q_by_seq[g.seq.seq_id]
        probs[i, : q.shape[0]] = q
    return DraftRejection([DraftGroup(g.first_row, g.drafts) for g in groups], probs)


def step_batch(
    step: StepInput, seqs: dict[str, SequenceState], prev_rows: dict[str, int], block_size: int
) -> tuple[_DraftBatch, list[tuple[SequenceState, int]]]:
    """The draft's rows for a step: every chunk's tokens, after those its cache misses
    (advancing draft_num_computed), and (state, K) per speculating row, whose last
    position is sampled."""
    batch, speculating = _DraftBatch(block_size), []
    for chunk in step.chunks:
        seq = seqs[chunk.seq_id]
        end = seq.num_computed + chunk.num_tokens
        begin = min(seq.draft_num_computed, seq.num_computed)
        known = seq.token_ids[begin : end - chunk.num_placeholders]
        if chunk.num_placeholders:  # NOTE: its last token is on the device only
            batch.placeholder_rows.append(len(batch.input_ids) + len(known))
            batch.placeholder_src.append(prev_rows[chunk.seq_id])
        batch.add(seq, begin, known + [0] * chunk.num_placeholders)
        seq.draft_num_computed = end
        if chunk.num_draft_slots:
            batch.sample_last()
            speculating.append((seq, chunk.num_draft_slots))
    if not speculating:
        batch.sample_last()  # NOTE: the forward wants a row of logits; unused
    return batch, speculating


class _DraftBatch:
    """A draft forward's rows as flat lists: each row some tokens from a start position."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[int] = []
        self.seq_lens: list[int] = []
        self.query_start_loc = [0]
        self.tables: list[list[int]] = []
        self.logits_indices: list[int] = []
        self.max_query_len = 0
        self.placeholder_rows: list[int] = []  # inputs the previous step's samples fill
        self.placeholder_src: list[int] = []  # their rows among those samples

    def add(self, seq: SequenceState, start: int, tokens: list[int]) -> None:
        bs, table, end = self.block_size, seq.block_table, start + len(tokens)
        self.input_ids.extend(tokens)
        self.positions.extend(range(start, end))
        self.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        self.seq_lens.append(end)
        self.query_start_loc.append(self.query_start_loc[-1] + len(tokens))
        self.tables.append(table[: -(-end // bs)])
        self.max_query_len = max(self.max_query_len, len(tokens))

    def sample_last(self) -> None:
        self.logits_indices.append(self.query_start_loc[-1] - 1)

    def upload(self, device: torch.device):
        width = max(len(t) for t in self.tables)
        padded = [b for t in self.tables for b in t + [0] * (width - len(t))]
        slots, tables, seq_lens, starts, input_ids, positions, logits_indices = upload_ints(
            [self.slots, padded, self.seq_lens, self.query_start_loc, self.input_ids,
             self.positions, self.logits_indices],
            device,
        )  # fmt: skip
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.view(len(self.tables), width).to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            query_start_loc=starts.to(torch.int32),
            max_query_len=self.max_query_len,
            max_seq_len=max(self.seq_lens),
            all_slots_valid=True,
        )
        return input_ids, positions, meta, logits_indices
