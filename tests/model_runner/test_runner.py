"""ModelRunner step semantics: preemption, seeded sampling across batches, state drops."""

from __future__ import annotations

import msgspec
import pytest

from model_runner.fault_injection import ForwardFaults, InjectedFault
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import ScheduledChunk, StepInput
from tests.model_runner.driver import GREEDY, Driver, DriverSeq

SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, max_tokens=12, ignore_eos=True)


def _run_seeded(runner, prompts, target, *, preempt_at=None):
    driver = Driver(runner)
    seqs = [DriverSeq(f"x{i}", list(p), SAMPLED, seed=None) for i, p in enumerate(prompts)]
    seqs[target].seed = 1234
    while not all(s.done for s in seqs):
        if preempt_at is not None and len(seqs[target].tokens) == preempt_at:
            driver.preempt(seqs[target])
            preempt_at = None
        driver.step(seqs)
    driver.flush()
    return seqs[target].tokens


def test_seeded_sampling_ignores_batch_and_preemption(runner, reference_cases):
    prompts = [ids for ids, _ in reference_cases[:4]]
    alone = _run_seeded(runner, prompts[:1], 0)
    batched = _run_seeded(runner, prompts, 0)
    preempted = _run_seeded(runner, prompts, 0, preempt_at=5)
    assert alone == batched == preempted
    assert len(alone) == 12
    other = _run_seeded(runner, prompts[1:2], 0)
    assert other != alone


def test_greedy_resumes_after_preemption(runner, reference_cases):
    cases = reference_cases[:3]
    driver = Driver(runner)
    seqs = [DriverSeq(f"g{i}", list(ids), GREEDY) for i, (ids, _) in enumerate(cases)]
    while len(seqs[1].tokens) < 10:
        driver.step(seqs)
    driver.preempt(seqs[1])
    driver.run(seqs)
    assert [s.tokens for s in seqs] == [ref for _, ref in cases]


def test_finished_sequences_are_dropped(runner, reference_cases):
    before = runner.num_active_sequences
    driver = Driver(runner)
    seq = DriverSeq("d0", list(reference_cases[0][0]), SamplingParams(temperature=0, max_tokens=2))
    while not seq.done:
        driver.step([seq])
    assert runner.num_active_sequences == before + 1
    out = runner.execute(StepInput(step_id=999, finished_seq_ids=["d0", "never-seen"]))
    assert out.step_id == 999 and out.sampled == [] and out.execute_seconds >= 0
    assert runner.num_active_sequences == before


def test_placeholder_rows_wait_on_a_failed_step_and_are_dropped(runner, reference_cases):
    """Overlap: a step planned while the one before ran takes that step's tokens on the
    device; when that step raised, its rows are dropped and the rest of the step runs."""
    (a_ids, _), (b_ids, b_ref) = reference_cases[:2]
    driver = Driver(runner, placeholders=True)
    a, b = DriverSeq("fa", list(a_ids), GREEDY), DriverSeq("fb", list(b_ids), GREEDY)
    driver.step([a])
    failing = driver._plan([a])
    assert [c.num_placeholders for c in failing.chunks] == [1]
    runner.faults = ForwardFaults("1")  # the next forward raises
    try:
        with pytest.raises(InjectedFault):
            runner.execute(failing)
    finally:
        runner.faults = ForwardFaults("")
    nxt = driver._plan([b])
    waiting = ScheduledChunk("fa", 1, len(a.blocks), [], 1)
    out = runner.execute(msgspec.structs.replace(nxt, chunks=[waiting, *nxt.chunks]))
    assert [(t.seq_id, t.token_id) for t in out.sampled] == [("fb", b_ref[0])]
    runner.execute(StepInput(step_id=driver.step_id, finished_seq_ids=["fa", "fb"]))
