"""The runner's per-sequence state and the flat tensors of one step.

NOTE: this runs every step for up to max_num_seqs sequences; everything is built with
Python lists and reaches the device in one copy, never per-token tensor ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, repeat

import torch

from model_runner.attention import AttentionMetadata, per_sequence_views
from model_runner.grammar import SequenceGrammar
from model_runner.sampling_params import SamplingParams
from model_runner.speculative import DraftPosition, SpecBatch, SpecGroup
from model_runner.step_input import NewSequence, StepInput
from model_runner.step_upload import upload_ints


class SequenceState:
    """What the runner remembers of one sequence between steps."""

    __slots__ = (
        "seq_id",
        "token_ids",
        "num_prompt_tokens",
        "num_output_tokens",
        "num_computed",
        "block_table",
        "sampling",
        "seed",
        "generator",
        "prompt_token_set",
        "output_counts",
        "grammar",
        "lora_slot",
        "num_pending",
        "draft_num_computed",
    )

    def __init__(self, new: NewSequence, grammar: SequenceGrammar | None = None):
        self.seq_id = new.seq_id
        self.token_ids: list[int] = list(new.token_ids)
        self.num_prompt_tokens = new.num_prompt_tokens
        self.num_output_tokens = new.num_output_tokens
        self.num_computed = new.num_computed_tokens
        self.block_table: list[int] = list(new.block_ids)
        self.sampling: SamplingParams = new.sampling
        self.seed = new.seed if new.seed is not None else new.sampling.seed
        self.generator: torch.Generator | None = None  # made on first seeded random draw
        self.prompt_token_set: frozenset[int] | None = None  # made when penalties need it
        self.output_counts: dict[int, int] | None = None  # made when penalties need it
        self.grammar = grammar  # structured output: its matcher has seen every output token
        self.lora_slot = new.lora_slot  # NOTE: its slot keeps this adapter while it lives
        # NOTE: sampled tokens still on their way to the host (0 or 1): the runner launches a
        # step before it collects the previous one, whose token feeds a placeholder row
        self.num_pending = 0
        # NOTE: a draft model (model_runner/draft_model.py): leading positions whose draft
        # K/V hold (at most num_computed once the step before is collected)
        self.draft_num_computed = new.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        """Tokens known to the device: those on the host and the pending one."""
        return len(self.token_ids) + self.num_pending

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_output_tokens += 1
        if self.output_counts is not None:
            self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def penalty_state(self) -> tuple[frozenset[int], dict[int, int]]:
        """(distinct prompt tokens, output token counts), built once, then kept up to date."""
        if self.prompt_token_set is None:
            self.prompt_token_set = frozenset(self.token_ids[: self.num_prompt_tokens])
        if self.output_counts is None:
            self.output_counts = {}
            for token in self.output_token_ids:
                self.output_counts[token] = self.output_counts.get(token, 0) + 1
        return self.prompt_token_set, self.output_counts


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """The flat tensors of one forward, plus which sequences get a sampled token."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R] int64: rows of the sampled tokens
    # R sampling rows, in the order of logits_indices: sequence states, and a DraftPosition
    # for each position of a speculating sequence
    sample_seqs: list[SequenceState | DraftPosition]
    spec: SpecBatch | None = None  # the speculating sequences, if any


GrammarFactory = Callable[[NewSequence], SequenceGrammar]


def apply_state_updates(
    seqs: dict[str, SequenceState], step: StepInput, make_grammar: GrammarFactory | None = None
) -> None:
    """Drop finished sequences, add new ones, and apply each chunk's block-table change.

    A new sequence with `sampling.grammar` gets its matcher from `make_grammar`, which
    replays the outputs it already has (a sequence re-sent after preemption).
    """
    for seq_id in step.finished_seq_ids:
        seqs.pop(seq_id, None)
    for new in step.new_sequences:
        grammar = None
        if new.sampling.grammar is not None:
            assert make_grammar is not None, "a grammar sequence needs a grammar factory"
            grammar = make_grammar(new)
        seqs[new.seq_id] = SequenceState(new, grammar)
    for chunk in step.chunks:
        table = seqs[chunk.seq_id].block_table
        if chunk.block_table_start < len(table):
            del table[chunk.block_table_start :]
        table.extend(chunk.block_ids)


@dataclass
class _FlatBatch:
    """A step's chunks as flat Python lists, before they become tensors."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    tables: list[list[int]] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    sample_seqs: list[SequenceState] = field(default_factory=list)
    spec_groups: list[SpecGroup] = field(default_factory=list)
    max_query_len: int = 0

    def add(
        self,
        seq: SequenceState,
        num: int,
        block_size: int,
        placeholder: bool,
        drafts: list[int] | None = None,
    ) -> None:
        """Append `num` tokens of `seq` from its num_computed on, and advance it.
        `placeholder`: a one-token row whose input the device fills (model_runner/placeholders).
        `drafts`: speculative tokens computed after them; every position samples, and
        num_computed moves past the accepted ones only once they are known (the collect)."""
        start, table = seq.num_computed, seq.block_table
        end = start + num
        assert placeholder or not seq.num_pending, "only a placeholder row follows a pending token"
        if num == 1:
            self.input_ids.append(0 if placeholder else seq.token_ids[start])
        else:
            self.input_ids.extend(seq.token_ids[start:end])
        width = num
        if drafts:
            self.input_ids.extend(drafts)
            width += len(drafts)
        self.positions.extend(range(start, start + width))
        self.slots.extend(
            table[p // block_size] * block_size + p % block_size
            for p in range(start, start + width)
        )
        self.seq_lens.append(start + width)
        self.query_start_loc.append(self.query_start_loc[-1] + width)
        self.tables.append(table[: -(-(start + width) // block_size)])
        self.max_query_len = max(self.max_query_len, width)
        seq.num_computed = end
        if end != seq.num_tokens:
            return
        last = self.query_start_loc[-1] - 1
        if not drafts:
            self.logits_indices.append(last)
            self.sample_seqs.append(seq)
            return
        first = len(self.sample_seqs)
        self.spec_groups.append(SpecGroup(first, seq, list(drafts)))
        for j in range(len(drafts) + 1):
            self.logits_indices.append(last - len(drafts) + j)
            self.sample_seqs.append(DraftPosition(seq, drafts[:j]))


def build_model_inputs(
    seqs: dict[str, SequenceState],
    step: StepInput,
    block_size: int,
    device: torch.device,
    per_sequence: bool = False,
) -> ModelInputs:
    """Flatten the step's chunks into one batch; advances each sequence's num_computed.

    `per_sequence`: attention inputs per sequence too (batch-invariant steps).
    """
    flat = _FlatBatch()
    for chunk in step.chunks:
        flat.add(
            seqs[chunk.seq_id],
            chunk.num_tokens,
            block_size,
            chunk.num_placeholders > 0,
            chunk.draft_token_ids,
        )
    tables, seq_lens, query_start_loc = flat.tables, flat.seq_lens, flat.query_start_loc
    width = max(len(t) for t in tables)
    padded = [b for t in tables for b in chain(t, repeat(0, width - len(t)))]
    # NOTE: one host-to-device copy for the whole step (model_runner/step_upload.py)
    slot_mapping, block_tables, seq_lens_t, query_start, input_ids, positions, logits = (
        upload_ints(
            [flat.slots, padded, seq_lens, query_start_loc, flat.input_ids, flat.positions,
             flat.logits_indices],
            device,
        )
    )  # fmt: skip
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=block_tables.view(len(tables), width).to(torch.int32),
        seq_lens=seq_lens_t.to(torch.int32),
        query_start_loc=query_start.to(torch.int32),
        max_query_len=flat.max_query_len,
        max_seq_len=max(seq_lens),
        all_slots_valid=True,  # NOTE: the flat batch has no padding
        per_sequence=(
            per_sequence_views(tables, seq_lens, query_start_loc, device) if per_sequence else None
        ),
    )
    return ModelInputs(
        input_ids=input_ids,
        positions=positions,
        meta=meta,
        logits_indices=logits,
        sample_seqs=flat.sample_seqs,
        spec=SpecBatch(flat.spec_groups) if flat.spec_groups else None,
    )
