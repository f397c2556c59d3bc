"""Grammar cache, matchers and the sampler's bitmask on a toy vocabulary (no model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import xgrammar as xgr

from model_runner import grammar_cache
from model_runner.grammar import GrammarBitmask, SequenceGrammar
from model_runner.grammar_cache import GrammarCache, GrammarError
from model_runner.input_batch import SequenceState
from model_runner.sampler import Sampler
from model_runner.sampling_params import GrammarSpec, SamplingParams
from model_runner.step_input import NewSequence

# NOTE: a raw vocabulary of single characters; token 0 is the end of sequence.
VOCAB = ["</s>", "a", "b", "c", "{", "}", '"', "1", "2", ":", " ", "x", "y", "z", ",", "3"]
EOS = 0
TOKEN = {text: i for i, text in enumerate(VOCAB)}
AB = GrammarSpec(kind="regex", spec="ab")
DIGITS = GrammarSpec(kind="regex", spec="[12]+")


def toy_info() -> xgr.TokenizerInfo:
    return xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])


@pytest.fixture
def cache() -> GrammarCache:
    return GrammarCache(toy_info, compile_threads=1)


def ids(text: str) -> list[int]:
    return [TOKEN[ch] for ch in text]


def make_seq(spec: GrammarSpec | None, cache: GrammarCache, outputs=(), **params):
    sampling = SamplingParams(grammar=spec, **params)
    new = NewSequence(
        seq_id="s",
        token_ids=[1, 2, *outputs],
        num_prompt_tokens=2,
        num_output_tokens=len(outputs),
        block_ids=[0],
        num_computed_tokens=0,
        sampling=sampling,
    )
    grammar = None if spec is None else SequenceGrammar(cache.get(spec), outputs)
    return SequenceState(new, grammar)


def allowed(bitmask: GrammarBitmask, row: int) -> set[int]:
    words = bitmask.mask[row].tolist()
    return {t for t in range(len(VOCAB)) if (words[t // 32] >> (t % 32)) & 1}


# --- the cache --------------------------------------------------------------------------


def test_a_repeated_spec_is_a_cache_hit(cache):
    first, cached_first = cache.compile(AB)
    again, cached_again = cache.compile(GrammarSpec(kind="regex", spec="ab"))
    assert (cached_first, cached_again) == (False, True)
    assert again is first
    assert cache.get(AB) is first  # a sequence's lookup is no second hit
    stats = cache.stats()
    assert (stats.compiles, stats.cache_hits, stats.cache_entries) == (1, 1, 1)
    assert stats.cache_bytes > 0 and stats.compile_seconds > 0


def test_strictness_is_part_of_the_key(cache):
    schema = '{"type": "object"}'
    cache.compile(GrammarSpec(kind="json_schema", spec=schema, strict=True))
    _, cached = cache.compile(GrammarSpec(kind="json_schema", spec=schema, strict=False))
    assert not cached and cache.stats().cache_entries == 2


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec(kind="regex", spec="(a"),
        GrammarSpec(kind="ebnf", spec='root ::= "a" |'),
        GrammarSpec(kind="json_schema", spec='{"type": "strin"}'),
        GrammarSpec(kind="structural_tag", spec='{"type": "nope"}'),
        GrammarSpec(kind="yaml", spec="a: 1"),
    ],
)
def test_a_bad_spec_is_a_grammar_error_without_xgrammar_internals(cache, spec):
    with pytest.raises(GrammarError) as info:
        cache.compile(spec)
    message = str(info.value)
    assert message and ".cc:" not in message and not message.startswith("[")
    assert cache.stats().cache_entries == 0


def test_over_the_byte_cap_least_recently_used_unpinned_entries_go(cache):
    cache.max_bytes = 1  # every entry is over the cap
    specs = [GrammarSpec(kind="regex", spec=s) for s in ("a", "b", "c")]
    cache.compile(specs[0])
    cache.pin("request-a", specs[0])
    cache.compile(specs[1])  # the newest entry is never evicted
    assert specs[0] in cache and specs[1] in cache
    cache.compile(specs[2])
    assert specs[0] in cache and specs[1] not in cache and specs[2] in cache
    cache.unpin("request-a")
    assert specs[0] not in cache and specs[2] in cache
    assert cache.stats().cache_entries == 1
    assert cache.stats().cache_bytes == cache.get(specs[2]).memory_size_bytes


def test_concurrent_compiles_of_one_spec_compile_it_once(cache, monkeypatch):
    real = grammar_cache.compile_spec

    def slow(compiler, spec):
        time.sleep(0.2)
        return real(compiler, spec)

    monkeypatch.setattr(grammar_cache, "compile_spec", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.compile(AB))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(cached for _, cached in results) == [False, True, True, True]
    assert len({id(compiled) for compiled, _ in results}) == 1
    assert cache.stats().compiles == 1


# --- matchers and the bitmask -----------------------------------------------------------


def test_a_replayed_matcher_masks_like_one_fed_token_by_token(cache):
    bitmask = GrammarBitmask(len(VOCAB))
    replayed = SequenceGrammar(cache.get(DIGITS), ids("12"))
    fed = SequenceGrammar(cache.get(DIGITS))
    for token in ids("12"):
        fed.accept(token)
    bitmask.fill([replayed, None, fed])
    assert allowed(bitmask, 0) == allowed(bitmask, 2) == {TOKEN["1"], TOKEN["2"], EOS}


def test_a_refused_token_leaves_the_matcher_where_it_was(cache):
    grammar = SequenceGrammar(cache.get(AB))
    grammar.accept(TOKEN["b"])
    assert grammar.num_rejected == 1
    grammar.accept(TOKEN["a"])
    grammar.accept(TOKEN["b"])
    grammar.accept(EOS)
    assert grammar.num_rejected == 1 and grammar.is_terminated


def test_allows_only_sees_a_complete_grammar(cache):
    bitmask = GrammarBitmask(len(VOCAB), rows=1)
    done = SequenceGrammar(cache.get(AB), ids("ab"))
    going = SequenceGrammar(cache.get(DIGITS), ids("1"))
    bitmask.fill([done, going])  # grows the buffer past its one row
    assert bitmask.allows_only(0, [EOS]) and not bitmask.allows_only(1, [EOS])


# --- the sampler ------------------------------------------------------------------------


def favouring(*tokens: int) -> torch.Tensor:
    """Logits that rank `tokens` first, in that order, then the rest."""
    logits = torch.zeros(len(VOCAB))
    for rank, token in enumerate(tokens):
        logits[token] = 10.0 - rank
    return logits


def test_greedy_rows_follow_the_grammar_and_plain_rows_are_untouched(cache):
    sampler = Sampler(len(VOCAB), [EOS])
    seqs = [
        make_seq(AB, cache, temperature=0),
        make_seq(None, cache, temperature=0),
        make_seq(AB, cache, outputs=ids("a"), temperature=0),
    ]
    logits = torch.stack([favouring(TOKEN["x"], TOKEN["a"])] * 3)
    out = sampler(logits, seqs)
    assert [t.token_id for t in out] == [TOKEN["a"], TOKEN["x"], TOKEN["b"]]


def test_logprobs_are_the_models_own_and_sampling_stays_in_the_grammar(cache):
    sampler = Sampler(len(VOCAB), [EOS], seed=3)
    logits = favouring(TOKEN["z"], TOKEN["2"], TOKEN["1"])
    raw = torch.log_softmax(logits, dim=-1)
    for seed in range(20):
        seq = make_seq(DIGITS, cache, temperature=1.0, logprobs=2, seed=seed)
        (token,) = sampler(logits[None].clone(), [seq])
        assert token.token_id in (TOKEN["1"], TOKEN["2"])
        assert token.logprob == pytest.approx(raw[token.token_id].item())
        assert [t for t, _ in token.top_logprobs] == [TOKEN["z"], TOKEN["2"]]


def test_penalties_and_logit_bias_cannot_leave_the_grammar(cache):
    sampler = Sampler(len(VOCAB), [EOS])
    seq = make_seq(AB, cache, temperature=0, logit_bias={TOKEN["x"]: 100.0}, repetition_penalty=2.0)
    (token,) = sampler(favouring(TOKEN["b"])[None], [seq])
    assert token.token_id == TOKEN["a"]


def test_min_tokens_yields_to_a_complete_grammar(cache):
    sampler = Sampler(len(VOCAB), [EOS])
    done = make_seq(AB, cache, outputs=ids("ab"), temperature=0, min_tokens=5)
    going = make_seq(DIGITS, cache, outputs=ids("1"), temperature=0, min_tokens=5)
    logits = torch.stack([favouring(EOS, TOKEN["2"])] * 2)
    out = sampler(logits, [done, going])
    assert [t.token_id for t in out] == [EOS, TOKEN["2"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_bitmask_kernel_masks_like_the_cpu_one(cache):
    """On CUDA the mask is copied over and applied by xgrammar's GPU kernel."""
    torch.manual_seed(0)
    grammars = [SequenceGrammar(cache.get(DIGITS)), None, SequenceGrammar(cache.get(AB), ids("a"))]
    bitmask = GrammarBitmask(len(VOCAB))
    rows = bitmask.fill(grammars)
    logits = torch.randn(3, len(VOCAB))
    on_cpu, on_gpu = logits.clone(), logits.cuda()
    bitmask.apply(on_cpu, rows)
    bitmask.apply(on_gpu, rows)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(on_cpu[1], logits[1])
    assert torch.isinf(on_cpu[2]).sum() == len(VOCAB) - 1
