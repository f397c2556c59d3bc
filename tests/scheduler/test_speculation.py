"""Speculation in the scheduler: n-gram proposals, their verification by a runner that
checks the KV it reads, rejected blocks returned, back-off, counters."""

from __future__ import annotations

import pytest

from actors.scheduler.ngram import propose_ngram
from model_runner.config import EngineConfigError, SpeculativeConfig
from model_runner.spec_config import parse_speculative_config
from tests.scheduler.fake_runner import Driver, FakeRunner, make_scheduler, request


def test_ngram_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert propose_ngram(tokens, 3, 2, 4) == [4, 5, 9]
    assert propose_ngram(tokens, 1, 2, 4) == [4]
    assert propose_ngram([5, 1, 2, 7, 1, 2, 8, 1, 2], 2, 2, 2) == [8, 1]  # the latest match
    assert propose_ngram([1, 2, 3, 4], 3, 2, 4) == []  # no earlier occurrence
    assert propose_ngram([3, 1, 2, 9, 2], 3, 1, 3) == [9, 2]  # only n=1 matches
    assert propose_ngram([1, 2, 1, 2], 0, 1, 2) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"method": "ngram", "num_speculative_tokens": 9}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "exceed"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs .model."),
        ('{"method": "draft_model", "model": "x", "load_format": "gguf"}', "load_format"),
        ('{"method": "eagle", "model": "x"}', "not supported"),
        ('{"method": "magic"}', "unknown method"),
        ('{"method": "ngram", "k": 3}', "unknown keys"),
        ("[1]", "JSON object"),
        ("{nope", "not JSON"),
    ],
)
def test_bad_speculative_configs_are_start_up_errors(text, message):
    with pytest.raises(EngineConfigError, match=message):
        parse_speculative_config(text)


def periodic(period: int, noise_every: int = 0):
    """The fake model repeats its history with this period (n-gram proposals hold), except
    at every `noise_every`-th position (they fail there)."""

    def next_token(seq_id: str, tokens: list[int]) -> int:
        if noise_every and len(tokens) % noise_every == 0:
            return 1 + (tokens[-1] * 7) % 40
        return tokens[-period]

    return next_token


def run(spec: SpeculativeConfig | None, next_token, prompts, num_blocks=64, draft=None, **kw):
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_model_len=128,
                           max_num_batched_tokens=32, speculative_config=spec)  # fmt: skip
    runner = FakeRunner(num_blocks, 4, next_token, draft_token=draft)
    driver = Driver(sched, runner)
    for i, prompt in enumerate(prompts):
        sched.add_request(request(f"r{i}", prompt, **kw))
    driver.run()
    streams: dict[str, list[int]] = {}
    for out in driver.outputs:
        streams.setdefault(out.request_id, []).extend(out.token_ids)
    assert sched.blocks.num_used_blocks == 0
    sched.blocks.check_invariants()
    return streams, sched, runner


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8, 9, 7], [10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("noise", [0, 5])
def test_outputs_equal_plain_decoding_and_blocks_come_back(k, noise):
    model = periodic(3, noise)
    plain, _, _ = run(None, model, PROMPTS, max_tokens=30)
    spec = SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=1, backoff_steps=0)
    got, sched, runner = run(spec, model, PROMPTS, max_tokens=30)
    assert got == plain
    stats = sched.spec.stats()
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == runner.num_accepted > 0
    assert stats.num_draft_tokens >= stats.num_accepted_tokens
    if noise:
        assert stats.num_accepted_tokens < stats.num_draft_tokens  # some were rejected
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens


@pytest.mark.parametrize("noise", [0, 4])
def test_draft_model_slots_are_filled_by_the_runner_and_blocks_come_back(noise):
    """With a draft model the plan carries proposal slots, not tokens; the runner's draft
    (here: the fake model itself, wrong at every `noise`-th position) fills them."""
    model = periodic(3)
    plain, _, _ = run(None, model, PROMPTS, max_tokens=30)
    spec = SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=4,
                             backoff_steps=0)  # fmt: skip
    got, sched, runner = run(spec, model, PROMPTS, num_blocks=24, draft=periodic(3, noise),
                             max_tokens=30)  # fmt: skip
    assert got == plain
    stats = sched.spec.stats()
    assert stats.num_accepted_tokens == runner.num_accepted > 0
    assert (stats.num_accepted_tokens < stats.num_draft_tokens) == bool(noise)


def test_stop_tokens_inside_an_accepted_run_cut_it():
    """The fake model repeats 5 6 0 ...: eos (0) falls inside runs of accepted proposals."""
    prompt = [5, 6, 0, 5, 6, 0, 5, 6]
    plain, _, _ = run(None, periodic(3), [prompt], max_tokens=30)
    got, _, _ = run(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1),
                    periodic(3), [prompt], max_tokens=30)  # fmt: skip
    assert got == plain == {"r0": [0]}
    plain, _, _ = run(None, periodic(3), [prompt], max_tokens=30, ignore_eos=True,
                      stop_token_ids=[6])  # fmt: skip
    got, _, _ = run(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1),
                    periodic(3), [prompt], max_tokens=30, ignore_eos=True,
                    stop_token_ids=[6])  # fmt: skip
    assert got == plain and plain["r0"][-1] == 6


@pytest.mark.parametrize("limit", [5, 6, 12])
def test_proposals_stay_within_the_runners_fast_verify_rows(limit):
    """max_verify_tokens (the fused CPU layer's rows): a step's decode rows plus its
    proposals never exceed it, every row gets the same share, and a batch too large for one
    proposal token per row does not speculate; output is unchanged."""
    spec = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, backoff_steps=0)
    model = periodic(3)
    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=128,
                           max_num_batched_tokens=32, speculative_config=spec)  # fmt: skip
    sched.spec.max_verify_tokens = limit
    driver = Driver(sched, FakeRunner(64, 4, model))
    for i, prompt in enumerate(PROMPTS):
        sched.add_request(request(f"r{i}", prompt, max_tokens=30))
    widest = {}  # decode rows -> the most proposal tokens of one row
    while (done := driver.step()) is not None:
        chunks = done[0].chunks
        if all(c.num_tokens == 1 for c in chunks):
            most = max(len(c.draft_token_ids) for c in chunks)
            widest[len(chunks)] = max(widest.get(len(chunks), 0), most)
    plain, _, _ = run(None, model, PROMPTS, max_tokens=30)
    got = {}
    for out in driver.outputs:
        got.setdefault(out.request_id, []).extend(out.token_ids)
    assert got == plain
    assert widest[3] == min(4, (limit - 3) // 3)  # 0, 1 and 3 proposal tokens a row
    assert (sched.spec.stats().num_accepted_tokens > 0) == (limit > 5)


def test_max_tokens_is_never_overshot():
    spec = SpeculativeConfig(num_speculative_tokens=8, prompt_lookup_min=1)
    got, _, _ = run(spec, periodic(3), PROMPTS, max_tokens=5)
    assert all(len(tokens) == 5 for tokens in got.values())


def test_proposals_that_keep_failing_back_off():
    """A window of poor proposals (or lookups that find nothing) pauses the sequence's
    speculation for `backoff_steps` steps; good ones keep it on."""
    from actors.scheduler.speculation import Speculation

    config = SpeculativeConfig(num_speculative_tokens=3, backoff_window=2,
                               backoff_min_acceptance=0.25, backoff_steps=5)  # fmt: skip
    spec = Speculation(config, 128)
    sched = make_scheduler()
    sched.add_request(request("r", [1, 2, 3]))
    seq = sched.waiting[0]
    spec.record(seq, 3, 1)
    spec.record(seq, 3, 1)  # 2 of 6 accepted: above a quarter
    assert spec.eligible(seq)
    spec.record(seq, 3, 0)
    spec.record_empty(seq)  # 0 of 4
    assert not spec.eligible(seq)
    spec.step += 5
    assert spec.eligible(seq)
    assert spec.num_drafts == 3 and spec.num_accepted_tokens == 2  # the empty one: not a draft
    assert spec.accepted_per_pos == [2, 0, 0]


def test_rows_with_penalties_min_tokens_or_grammars_speculate_too():
    """The runner samples each position after the proposals before it, so these rows
    speculate like any other (their sampling is checked in tests/integration)."""
    spec = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1)
    for sampling in ({"frequency_penalty": 0.5}, {"min_tokens": 20}):
        _, sched, _ = run(spec, periodic(3), PROMPTS[:1], max_tokens=20, **sampling)
        assert sched.spec.num_drafts > 0


def test_rejected_proposals_return_their_blocks_at_once():
    """A tight cache: proposals take blocks for K tokens; the rejected ones come back when
    the step returns, so the requests still finish as they do plainly."""
    model = periodic(3, noise_every=4)
    spec = SpeculativeConfig(num_speculative_tokens=8, prompt_lookup_min=1, backoff_steps=0)
    plain, _, _ = run(None, model, PROMPTS, num_blocks=24, max_tokens=40)
    got, sched, _ = run(spec, model, PROMPTS, num_blocks=24, max_tokens=40)
    assert got == plain
    assert sched.spec.num_accepted_tokens < sched.spec.num_draft_tokens


def test_no_proposals_while_more_sequences_decode_than_disable_by_batch_size():
    prompts = [[base + i % 3 for i in range(7)] for base in range(10, 70, 10)]  # six rows
    plain, _, _ = run(None, periodic(3), prompts, max_tokens=24)
    drafts = {}
    for cut_off in (4, 6, None):
        spec = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1,
                                 disable_by_batch_size=cut_off)  # fmt: skip
        got, sched, _ = run(spec, periodic(3), prompts, max_tokens=24)
        assert got == plain
        drafts[cut_off] = sched.spec.num_drafts
    assert drafts[4] == 0 and drafts[6] > 0 and drafts[None] == drafts[6]
    with pytest.raises(EngineConfigError, match="disable_by_batch_size"):
        parse_speculative_config('{"method": "ngram", "disable_by_batch_size": 0}')
