"""How `Scheduler.schedule` fills a Plan: running sequences first, then waiting ones.

`ahead`: a step is in flight (overlap, see actors/scheduler/overlap.py). Then sequences
whose next row depends on the host knowing the token in flight are skipped, nothing is
preempted or ended for want of blocks, and the plan stops where an allocation fails.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from actors.scheduler.block_manager import Allocation
from actors.scheduler.overlap import plans_ahead
from actors.scheduler.plan import Plan
from actors.scheduler.sequence import SeqStatus, Sequence
from actors.scheduler.speculation import DRAFT_SLOT
from model_runner.step_input import NewSequence, ScheduledChunk

if TYPE_CHECKING:
    from actors.scheduler.scheduler import Scheduler


def schedule_running(sched: Scheduler, plan: Plan, ahead: bool) -> bool:
    """Continue running sequences in order; returns whether any was preempted."""
    running, preempted, i = sched.running, False, 0
    while i < len(running) and plan.budget > 0 and len(plan.scheduled) < sched.max_num_seqs:
        seq = running[i]
        if ahead and not plans_ahead(seq, sched.max_model_len, sched.spec):
            i += 1
            continue
        num_tokens = min(seq.num_planned_tokens - seq.num_scheduled, plan.budget)
        drafts, alloc = [], None
        if num_tokens == 1 and seq.num_pending == 0:  # NOTE: its tokens are all known
            drafts, alloc = propose(sched, seq, plan.budget)
        if alloc is None:
            alloc = sched.blocks.allocate(seq.seq_id, seq.num_scheduled, num_tokens)
        if alloc is None and ahead:
            sched.sync_next = True  # NOTE: preemption waits until no step is in flight
            break
        while alloc is None and len(running) - 1 > i:
            preempt(sched, running.pop())
            preempted = True
            alloc = sched.blocks.allocate(seq.seq_id, seq.num_scheduled, num_tokens)
        if alloc is None:
            running.pop()  # NOTE: seq is the newest left
            if i == 0:  # it holds every used block and still cannot grow
                sched.retire(seq, unlink=False)
                sched.emit(seq, [], "length")
            else:
                preempt(sched, seq)
                preempted = True
            break
        add_to_plan(plan, sched, seq, num_tokens, alloc, drafts)
        i += 1
    return preempted


def propose(sched: Scheduler, seq: Sequence, budget: int) -> tuple[list[int], Allocation | None]:
    """A decode row's speculative tokens and the blocks for them; ([], None) when it does not
    speculate this step (not eligible, nothing proposed, or no blocks for the proposal)."""
    spec = sched.spec
    if spec is None or not spec.eligible(seq):
        return [], None
    drafts = spec.propose(seq, budget)
    if drafts is None:
        return [], None
    if not drafts:
        spec.record_empty(seq)
        return [], None
    # NOTE: proposals take blocks only while a block is left for every running sequence
    if sched.blocks.num_free_blocks < len(sched.running) + -(-len(drafts) // sched.block_size):
        return [], None
    alloc = sched.blocks.allocate(seq.seq_id, seq.num_scheduled, 1 + len(drafts))
    if alloc is None:
        return [], None
    spec.took(len(drafts))
    return drafts, alloc


def schedule_waiting(sched: Scheduler, plan: Plan, ahead: bool) -> None:
    """Admit waiting sequences (FCFS) while budget, seats and blocks last."""
    running, waiting = sched.running, sched.waiting
    # NOTE: samples that will fork from a running sequence hold their seats already.
    seats = sched.max_num_seqs - len(running) - sum(len(s.forks) for s in running)
    adapters_in_use = {s.request.lora[0] for s in running if s.request.lora is not None}
    no_slot: list[Sequence] = []  # NOTE: waiting for an adapter slot; the others go past
    while waiting and plan.budget > 0 and len(plan.scheduled) < sched.max_num_seqs:
        seq = waiting[0]
        if running and 1 + len(seq.forks) > seats:
            break
        lora, slot = seq.request.lora, -1
        if lora is not None:
            slot = sched.loras.pick(lora[0], adapters_in_use)
            if slot is None:
                no_slot.append(waiting.popleft())
                continue
        if sched.blocks.has_blocks(seq.seq_id):
            break  # NOTE: a finished namesake's blocks are freed when its last step returns
        hits = sched.prefix_cache.lookup(seq)
        num_computed = len(hits) * sched.block_size
        num_tokens = min(seq.num_tokens - num_computed, plan.budget)
        alloc = sched.blocks.allocate(seq.seq_id, num_computed, num_tokens, hits)
        if alloc is None:
            if running or ahead:
                break
            waiting.popleft()  # NOTE: cannot fit even alone; never deadlock
            sched.retire(seq, unlink=False)
            sched.emit(seq, [], "length")
            continue
        waiting.popleft()
        if lora is not None:
            sched.loras.assign(slot, *lora)
            seq.request.lora_slot = slot
            adapters_in_use.add(lora[0])
        seats -= 1 + len(seq.forks)
        if seq.request.queue_seconds is None:
            seq.request.queue_seconds = max(0.0, time.time() - seq.request.arrival_time)
        seq.status = SeqStatus.RUNNING
        seq.num_computed = seq.num_scheduled = num_computed
        running.append(seq)
        sched.prefix_cache.count_query(seq, num_computed)
        add_to_plan(plan, sched, seq, num_tokens, alloc)
    waiting.extendleft(reversed(no_slot))


def add_to_plan(
    plan: Plan,
    sched: Scheduler,
    seq: Sequence,
    num_tokens: int,
    alloc: Allocation,
    drafts: list[int] | None = None,
) -> None:
    start = alloc.block_table_start
    if not seq.on_runner:
        plan.new_seqs.append(
            NewSequence(
                seq_id=seq.seq_id,
                token_ids=list(seq.token_ids),
                num_prompt_tokens=seq.prompt_len,
                num_output_tokens=seq.num_output_tokens,
                block_ids=sched.blocks.block_table(seq.seq_id)[:start],
                num_computed_tokens=seq.num_computed,
                sampling=seq.request.sampling,
                seed=seq.seed,
                lora_slot=seq.request.lora_slot,
            )
        )
        seq.on_runner = True
    # NOTE: a placeholder row is a one-token decode of the token the step in flight samples.
    placeholders = seq.num_pending
    assert placeholders == 0 or (placeholders, num_tokens) == (1, 1)
    drafts = drafts or []
    # NOTE: slots for a draft model's proposals carry no tokens (the runner makes them)
    slots = len(drafts) if drafts and drafts[0] == DRAFT_SLOT else 0
    plan.chunks.append(
        ScheduledChunk(
            seq.seq_id,
            num_tokens,
            start,
            alloc.block_ids,
            placeholders,
            [] if slots else drafts,
            slots,
        )
    )
    plan.copies.extend(alloc.copies)
    plan.scheduled.append((seq, num_tokens))
    seq.num_drafts = len(drafts)
    if seq.num_scheduled + num_tokens == seq.num_planned_tokens:
        plan.samplers.append(seq)
    plan.budget -= num_tokens + len(drafts)


def preempt(sched: Scheduler, seq: Sequence) -> None:
    """Recompute later: free the blocks, back to the front of the waiting queue."""
    assert not seq.in_flight, "a sequence in flight is never preempted"
    sched.blocks.free(seq.seq_id)
    seq.num_computed = seq.num_scheduled = 0
    seq.status = SeqStatus.WAITING
    if seq.on_runner:
        sched.finished_ids.append(seq.seq_id)
        seq.on_runner = False
    sched.waiting.appendleft(seq)
    sched.preemptions += 1
