"""A stand-in for the model runner that checks every step against a simulated KV cache.

Each KV slot holds the token id written there. A step applies finished_seq_ids, new
sequences, block copies (all read before any is written) and block-table deltas, writes the
chunks' tokens, then checks that every slot each sequence attends to holds its own token:
that catches wrong prefix hits, missing or wrong copy-on-write, and writes into blocks that
another sequence reads. A chunk reaching the end of its tokens samples one new token.
A placeholder chunk (overlap) must be a one-token decode of the token this runner sampled
for it in the step before; after a failed step such rows are dropped, as the runner does.
Draft slots (`num_draft_slots`) are filled by `draft_token`, a stand-in draft model.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

from actors.protocol import TokenizedRequest
from actors.scheduler.scheduler import Scheduler
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import SampledToken, StepInput, StepOutput


class _RunnerSeq:
    def __init__(self, token_ids: list[int], table: list[int], num_computed: int) -> None:
        self.token_ids = token_ids
        self.table = table
        self.num_computed = num_computed


class FakeRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        next_token: Callable[[str, list[int]], int] | None = None,
        seed: int = 0,
        seconds_per_token: float = 0.0,
        draft_token: Callable[[str, list[int]], int] | None = None,
    ) -> None:
        self.draft_token = draft_token
        self.block_size = block_size
        self.seconds_per_token = seconds_per_token  # device time per computed token
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[str, _RunnerSeq] = {}
        rng = random.Random(seed)
        self.next_token = next_token or (lambda seq_id, tokens: rng.randrange(1, 50))
        self.last_sampled: tuple[int, dict[str, int]] = (-1, {})  # (step id, seq id -> token)
        self.num_placeholders = 0  # placeholder rows computed
        self.num_accepted = 0  # speculative tokens accepted

    def fail(self, step: StepInput) -> None:
        """A step that raised in the forward, after taking in the sequence changes."""
        self.last_sampled = (-1, {})
        self._take_sequences(step)

    def _take_sequences(self, step: StepInput) -> None:
        for seq_id in step.finished_seq_ids:
            del self.seqs[seq_id]
        for new in step.new_sequences:
            assert new.seq_id not in self.seqs, f"{new.seq_id} sent twice"
            self.seqs[new.seq_id] = _RunnerSeq(
                list(new.token_ids), list(new.block_ids), new.num_computed_tokens
            )

    def _resolve_placeholders(self, step: StepInput) -> list:
        """The chunks to compute: placeholder rows checked, unresolvable ones dropped."""
        prev_id, prev = self.last_sampled
        prev = prev if prev_id == step.step_id - 1 else {}
        self.last_sampled = (-1, {})
        kept = []
        for chunk in step.chunks:
            if chunk.num_placeholders:
                assert chunk.num_placeholders == 1 and chunk.num_tokens == 1
                if chunk.seq_id not in prev:
                    continue  # its previous step failed
                seq = self.seqs[chunk.seq_id]
                assert seq.num_computed == len(seq.token_ids) - 1
                assert seq.token_ids[-1] == prev[chunk.seq_id]
                self.num_placeholders += 1
            kept.append(chunk)
        return kept

    def execute(self, step: StepInput) -> StepOutput:
        bs = self.block_size
        self._take_sequences(step)
        chunks = self._resolve_placeholders(step)
        sources = {src: list(self.kv[src]) for src, _ in step.block_copies}
        for src, dst in step.block_copies:
            self.kv[dst] = list(sources[src])
        written: dict[tuple[int, int], str] = {}
        proposals = {c.seq_id: self._proposals(c) for c in chunks}
        for chunk in chunks:
            seq = self.seqs[chunk.seq_id]
            del seq.table[chunk.block_table_start :]
            seq.table.extend(chunk.block_ids)
            end = seq.num_computed + chunk.num_tokens
            drafts = proposals[chunk.seq_id]
            assert 0 < chunk.num_tokens and end <= len(seq.token_ids)
            assert not drafts or (chunk.num_tokens == 1 and end == len(seq.token_ids))
            width = -(-(end + len(drafts)) // bs)
            assert len(seq.table) == width, "table does not cover the computed tokens"
            inputs = seq.token_ids[seq.num_computed : end] + list(drafts)
            for pos, token in enumerate(inputs, start=seq.num_computed):
                slot = (seq.table[pos // bs], pos % bs)
                assert slot not in written, f"{chunk.seq_id} and {written[slot]} write {slot}"
                written[slot] = chunk.seq_id
                self.kv[slot[0]][slot[1]] = token
        sampled = []
        for chunk in chunks:
            seq = self.seqs[chunk.seq_id]
            end = seq.num_computed + chunk.num_tokens
            for pos in range(end):
                got = self.kv[seq.table[pos // bs]][pos % bs]
                assert got == seq.token_ids[pos], f"{chunk.seq_id} reads {got} at {pos}"
            seq.num_computed = end
            if end == len(seq.token_ids):
                # NOTE: speculation: each position samples from the history with the
                # proposals before it; the run stops at the first sample that differs
                drafts = proposals[chunk.seq_id]
                for j in range(len(drafts) + 1):
                    token = self.next_token(chunk.seq_id, seq.token_ids)
                    seq.token_ids.append(token)
                    sampled.append(SampledToken(chunk.seq_id, token))
                    if j == len(drafts) or token != drafts[j]:
                        break
                    seq.num_computed += 1
                    self.num_accepted += 1
        self.last_sampled = (step.step_id, {t.seq_id: t.token_id for t in sampled})  # the last
        device_seconds = self.seconds_per_token * sum(c.num_tokens for c in chunks)
        return StepOutput(step_id=step.step_id, sampled=sampled, device_seconds=device_seconds)

    def _proposals(self, chunk) -> list[int]:
        if not chunk.num_draft_slots:
            return list(chunk.draft_token_ids)
        assert not chunk.draft_token_ids and chunk.num_tokens == 1 and not chunk.num_placeholders
        tokens = list(self.seqs[chunk.seq_id].token_ids)
        for _ in range(chunk.num_draft_slots):
            tokens.append(self.draft_token(chunk.seq_id, tokens))
        return tokens[len(tokens) - chunk.num_draft_slots :]


class Config:
    """Duck-typed engine config: the fields the scheduler reads."""

    def __init__(self, **overrides) -> None:
        self.max_num_seqs = 8
        self.max_num_batched_tokens = 64
        self.enable_prefix_caching = True
        self.max_waiting = 1024
        self.__dict__.update(overrides)


def make_scheduler(
    num_blocks: int = 16, block_size: int = 4, max_model_len: int = 64, eos=(0,), **config
) -> Scheduler:
    return Scheduler(Config(**config), num_blocks, block_size, max_model_len, list(eos))


def request(
    request_id: str,
    prompt: list[int],
    cache_salt: str | None = None,
    feature: str = "none",
    **sampling,
) -> TokenizedRequest:
    sampling.setdefault("max_tokens", 8)
    return TokenizedRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling=SamplingParams(**sampling),
        cache_salt=cache_salt,
        arrival_time=time.time(),
        feature=feature,
    )


def counter_tokens(start: int = 100) -> Callable[[str, list[int]], int]:
    """Deterministic sampled tokens: start, start + 1, ... across all sequences."""
    state = [start]

    def next_token(seq_id: str, tokens: list[int]) -> int:
        state[0] += 1
        return state[0] - 1

    return next_token


class Driver:
    """schedule -> FakeRunner.execute -> update, checking invariants after each step."""

    def __init__(self, sched: Scheduler, runner: FakeRunner | None = None) -> None:
        self.sched = sched
        bm = sched.blocks
        self.runner = runner or FakeRunner(bm.num_blocks, bm.block_size, counter_tokens())
        self.outputs = []

    def step(self):
        """One step; returns (StepInput, StepTokens) or None when nothing was scheduled."""
        step = self.sched.schedule()
        if step is None:
            self.outputs.extend(self.sched.take_finished_aborts().outputs)
            return None
        tokens = self.sched.update(self.runner.execute(step))
        self.outputs.extend(tokens.outputs)
        self.check()
        return step, tokens

    def run(self, max_steps: int = 1000) -> int:
        for n in range(max_steps):
            if self.step() is None:
                return n
        raise AssertionError("did not finish")

    def check(self) -> None:
        bm = self.sched.blocks
        bm.check_invariants()
        for seq in self.sched.running:
            if not seq.on_runner:  # forked this step, sent with the next one
                continue
            mine, table = self.runner.seqs[seq.seq_id], bm.block_table(seq.seq_id)
            # NOTE: blocks of rejected proposals leave the runner's table with its next chunk
            assert mine.table[: len(table)] == table
            assert mine.num_computed == seq.num_computed
            assert mine.token_ids == seq.token_ids

    def tokens_of(self, request_id: str, index: int = 0) -> list[int]:
        return [
            t for o in self.outputs if (o.request_id, o.index) == (request_id, index)
            for t in o.token_ids
        ]  # fmt: skip


class OverlapDriver(Driver):
    """As Driver, with overlap: a step is planned while the one before is in flight (two at
    most), results come back in order. The runner executes a step before its result is
    taken, as the executor's worker does."""

    def __init__(self, sched: Scheduler, runner: FakeRunner | None = None) -> None:
        super().__init__(sched, runner)
        self.in_flight: deque[StepInput] = deque()
        self.steps: list[StepInput] = []

    def plan(self) -> None:
        while self.sched.num_steps_in_flight < 2:
            step = self.sched.schedule()
            self.outputs.extend(self.sched.take_finished_aborts().outputs)
            if step is None:
                return
            self.in_flight.append(step)
            self.steps.append(step)

    def step(self, fail: bool = False):
        """Plan ahead, then take the oldest step's result (or its failure)."""
        self.plan()
        if not self.in_flight:
            return None
        step = self.in_flight.popleft()
        if fail:
            self.runner.fail(step)
            tokens = self.sched.fail_step(step.step_id)
        else:
            tokens = self.sched.update(self.runner.execute(step))
        self.outputs.extend(tokens.outputs)
        self.check()
        return step, tokens

    def check(self) -> None:
        """Block invariants; tables only for running sequences or ones a step in flight
        still computes; the runner holds at least what the scheduler knows."""
        sched = self.sched
        sched.blocks.check_invariants()
        in_flight = {c.seq_id for s in self.in_flight for c in s.chunks}
        running = {s.seq_id for s in sched.running}
        assert sched.blocks.seq_ids() - running <= in_flight
        for seq in sched.running:
            if not seq.on_runner or seq.seq_id in in_flight:
                continue
            mine = self.runner.seqs[seq.seq_id]
            assert mine.table == sched.blocks.block_table(seq.seq_id)
            assert mine.num_computed == seq.num_computed
            assert mine.token_ids == seq.token_ids
