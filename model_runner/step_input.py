"""What the scheduler asks of the model runner for one step, and what comes back.

The scheduler sends a sequence's full data once (`NewSequence`), then only changes
(`ScheduledChunk`). The runner keeps each sequence's token ids, block table and sampling
state between steps until the id shows up in `finished_seq_ids`.
"""

from __future__ import annotations

import msgspec

from model_runner.sampling_params import SamplingParams


class NewSequence(msgspec.Struct, frozen=True, kw_only=True):
    """A sequence the runner has not seen yet (or again, after preemption)."""

    seq_id: str
    token_ids: list[int]  # prompt, plus outputs generated before a preemption
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt (for penalties)
    num_output_tokens: int = 0  # outputs already counted (min_tokens, seeded sampling)
    block_ids: list[int]  # the block table at admission
    num_computed_tokens: int  # leading tokens whose K/V already sit in the cache
    sampling: SamplingParams
    seed: int | None = None  # the sample's own seed (sampling.seed + sample index)
    lora_slot: int = -1  # its adapter's slot (model_runner.lora); -1: the base model


class ScheduledChunk(msgspec.Struct, frozen=True, array_like=True):
    """Compute `num_tokens` more tokens of a sequence this step.

    The tokens are token_ids[num_computed : num_computed + num_tokens]; when that reaches
    the end of token_ids the runner samples one new token and appends it.
    Before the step, the block table is cut at `block_table_start` and `block_ids` appended
    (a plain append, or the replacement of the last block after copy-on-write).
    `num_placeholders` (0 or 1; overlap): the chunk's last input token is the one the
    previous step samples for this sequence, which the scheduler does not know yet; the
    runner takes it from its record of that step's samples (then num_tokens == 1).
    `draft_token_ids` (speculative decoding; then num_tokens == 1, no placeholder): tokens
    proposed after the chunk's last one, computed with it; the runner samples every
    position and returns the accepted proposals plus one token (model_runner/speculative.py).
    `num_draft_slots` (a draft model; then draft_token_ids is empty, num_tokens == 1, no
    placeholder): the runner's draft model proposes that many tokens before the step and
    they are verified like the scheduler's (the blocks for them are in the table).
    """

    seq_id: str
    num_tokens: int
    block_table_start: int
    block_ids: list[int]
    num_placeholders: int = 0
    draft_token_ids: list[int] = []
    num_draft_slots: int = 0


def lora_key(name: str, generation: int) -> str:
    """An adapter loaded under `name` for the `generation`-th time (start-up ones: 0)."""
    return f"{name}#{generation}"


class LoraLoad(msgspec.Struct, frozen=True, kw_only=True):
    """Before the step: make `slot` hold adapter `key` (read from `path` unless cached)."""

    slot: int
    key: str  # the adapter's name and load generation: "name#generation"
    path: str


class StepInput(msgspec.Struct, frozen=True, kw_only=True):
    step_id: int
    new_sequences: list[NewSequence] = []
    chunks: list[ScheduledChunk] = []  # every sequence computed this step, new ones too
    finished_seq_ids: list[str] = []  # drop their state before the step (finished/preempted)
    block_copies: list[tuple[int, int]] = []  # (src, dst) block copies before the forward
    lora_loads: list[LoraLoad] = []  # adapter slots to fill before the forward


class SampledToken(msgspec.Struct, frozen=True, array_like=True):
    """One new token of one sequence; logprobs only when the request asked for them."""

    seq_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class StepOutput(msgspec.Struct, frozen=True, kw_only=True):
    step_id: int
    # One token per sampled sequence, in order; a speculating one has its accepted tokens
    # and the one after them as consecutive entries (1 to K + 1).
    sampled: list[SampledToken] = []
    execute_seconds: float = 0.0  # host wall time of the whole step
    device_seconds: float = 0.0  # the device's time for it (CUDA events; on the CPU, wall time)
