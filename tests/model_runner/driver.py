"""A tiny step driver for ModelRunner tests: assigns blocks itself, no scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence, SampledToken, ScheduledChunk, StepInput

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


@dataclass
class DriverSeq:
    seq_id: str
    prompt: list[int]
    sampling: SamplingParams
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    outputs: list[SampledToken] = field(default_factory=list)
    started: bool = False
    done: bool = False
    sampled_at: int | None = None  # the step that sampled its last token (None: none yet)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.tokens


class Driver:
    """Runs sequences to completion through `runner.execute`, step by step.

    `chunk_size` caps a prefill chunk; `token_budget` caps the tokens of one step (decodes
    first, then prefill chunks), so prefills and decodes mix as with the real scheduler.
    `placeholders` (overlap; default: the runner's `config.async_scheduling`): a decode of
    the token the step before sampled is sent as a placeholder row, its input left for the
    runner to fill. Each step checks that the runner sampled exactly the sequences whose
    chunk reached their end (a row it dropped would otherwise leave the driver out of step).
    """

    def __init__(
        self,
        runner: ModelRunner,
        chunk_size: int | None = None,
        token_budget: int = 4096,
        placeholders: bool | None = None,
    ):
        self.runner = runner
        if placeholders is None:
            placeholders = runner.config.async_scheduling
        self.placeholders = placeholders
        self.chunk_size = chunk_size
        self.token_budget = token_budget
        self.free = list(range(runner.num_blocks))
        self.step_id = 0
        self.pending_finished: list[str] = []
        self.pending_copies: list[tuple[int, int]] = []
        self.refs: dict[int, int] = {}
        self.samplers: list[str] = []  # the sequences the last planned step samples for

    def _alloc(self) -> int:
        block = self.free.pop(0)
        self.refs[block] = 1
        return block

    def _grow(self, seq: DriverSeq, num_tokens: int) -> list[int]:
        need = -(-num_tokens // self.runner.block_size) - len(seq.blocks)
        new = [self._alloc() for _ in range(max(need, 0))]
        seq.blocks.extend(new)
        return new

    def _plan(self, seqs: list[DriverSeq]) -> StepInput:
        new_seqs, chunks, budget, samplers = [], [], self.token_budget, []
        ordered = sorted(seqs, key=lambda s: s.num_computed < len(s.all_tokens) - 1)
        for seq in ordered:
            if seq.done or budget <= 0:
                continue
            remaining = len(seq.all_tokens) - seq.num_computed
            num = min(remaining, budget, self.chunk_size or remaining)
            start = len(seq.blocks)
            new_blocks = self._grow(seq, seq.num_computed + num)
            if not seq.started:
                new_seqs.append(
                    NewSequence(
                        seq_id=seq.seq_id,
                        token_ids=seq.all_tokens,
                        num_prompt_tokens=len(seq.prompt),
                        num_output_tokens=len(seq.tokens),
                        block_ids=list(seq.blocks),
                        num_computed_tokens=seq.num_computed,
                        sampling=seq.sampling,
                        seed=seq.seed,
                    )
                )
                seq.started = True
            # NOTE: only a token sampled by the step just before: never a one-token prompt.
            last_sampled = seq.sampled_at is not None and seq.sampled_at == self.step_id - 1
            placeholder = self.placeholders and num == remaining == 1 and last_sampled
            chunks.append(ScheduledChunk(seq.seq_id, num, start, new_blocks, int(placeholder)))
            seq.num_computed += num
            if num == remaining:
                samplers.append(seq.seq_id)
            budget -= num
        step = StepInput(
            step_id=self.step_id,
            new_sequences=new_seqs,
            chunks=chunks,
            finished_seq_ids=self.pending_finished,
            block_copies=self.pending_copies,
        )
        self.step_id += 1
        self.pending_finished, self.pending_copies = [], []
        self.samplers = samplers
        return step

    def step(self, seqs: list[DriverSeq]) -> None:
        """Plan and execute one step; record sampled tokens and finish sequences."""
        by_id = {s.seq_id: s for s in seqs}
        out = self.runner.execute(self._plan(seqs))
        assert [t.seq_id for t in out.sampled] == self.samplers, "the runner dropped a row"
        for sampled in out.sampled:
            seq = by_id[sampled.seq_id]
            seq.tokens.append(sampled.token_id)
            seq.outputs.append(sampled)
            seq.sampled_at = out.step_id
            p = seq.sampling
            stop = not p.ignore_eos and sampled.token_id in self.runner.eos_token_ids
            if stop or len(seq.tokens) >= p.max_tokens:
                self.finish(seq)

    def finish(self, seq: DriverSeq) -> None:
        seq.done = True
        self.pending_finished.append(seq.seq_id)
        for block in seq.blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)
        seq.blocks = []

    def preempt(self, seq: DriverSeq) -> None:
        """Drop the sequence's blocks; it is re-sent whole (prompt + outputs) next step."""
        self.finish(seq)
        seq.done, seq.started, seq.num_computed = False, False, 0

    def run(self, seqs: list[DriverSeq]) -> list[list[int]]:
        while not all(s.done for s in seqs):
            self.step(seqs)
        self.flush()
        return [s.tokens for s in seqs]

    def flush(self) -> None:
        """Tell the runner about finished sequences (a step with no chunks)."""
        if self.pending_finished or self.pending_copies:
            self.runner.execute(self._plan([]))

    def fork(self, parent: DriverSeq, seq_id: str) -> DriverSeq:
        """A copy of `parent` sharing its full blocks; its last block is copied (COW).

        The child recomputes the parent's last token (to get logits), so it samples next.
        """
        child = DriverSeq(seq_id, list(parent.prompt), parent.sampling, parent.seed)
        child.tokens = list(parent.tokens)
        total = len(parent.all_tokens)
        child.num_computed = total - 1
        full = (total - 1) // self.runner.block_size
        child.blocks = parent.blocks[:full]
        for block in child.blocks:
            self.refs[block] += 1
        if len(parent.blocks) > full:
            dst = self._alloc()
            self.pending_copies.append((parent.blocks[full], dst))
            child.blocks.append(dst)
        return child


def generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    sampling: SamplingParams = GREEDY,
    chunk_size: int | None = None,
    token_budget: int = 4096,
    placeholders: bool | None = None,
) -> list[list[int]]:
    """Run all prompts together to completion; returns each one's output token ids."""
    seqs = [DriverSeq(f"s{i}", list(p), sampling) for i, p in enumerate(prompts)]
    return Driver(runner, chunk_size, token_budget, placeholders).run(seqs)


def beside_eager(runner: ModelRunner, path, runs, params: SamplingParams) -> list:
    """(eager logits, `path`'s logits) of every step `path` (the runner's compiled or fused
    decode path) ran while generating each prompt list in `runs`: the eager forward runs
    first on the same inputs (both write the step's K/V at the same slots)."""
    seen, real_run = [], path.run

    def both(*args):
        eager = runner.model(*args)
        out = real_run(*args)
        seen.append((eager, out))
        return out

    path.run = both
    try:
        for prompts in runs:
            generate(runner, prompts, params)
    finally:
        path.run = real_run
    return seen
