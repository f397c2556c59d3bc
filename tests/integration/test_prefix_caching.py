"""Automatic prefix caching end to end: same greedy output, cached tokens, salts."""

from __future__ import annotations

import httpx
import pytest

from api import LLM, SamplingParams
from tests.conftest import settled_stats

SYSTEM = (
    "You are a careful assistant for a public library. Answer questions about opening hours, "
    "membership, lending rules, late fees, events for children, study rooms, printing, and the "
    "digital catalogue. Be brief, polite and precise, and never invent policies. "
) * 6
QUESTIONS = [
    "How long can I keep a book?",
    "Can children join the reading club?",
    "Is there a fee for printing?",
    "When does the library open on Sunday?",
    "How do I reserve a study room?",
    "Can I renew a loan online?",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
BLOCK_BYTES_F32 = 16 * 30 * 2 * 3 * 64 * 4  # tokens x layers x (K, V) x kv heads x dim x fp32


def run(enable_prefix_caching: bool, num_blocks: int):
    # NOTE: max_model_len = the cache's tokens: one request must fit (a start-up check)
    llm = LLM(dtype="float32", max_model_len=num_blocks * 16, use_tqdm=False,
              kv_cache_memory=num_blocks * BLOCK_BYTES_F32 / 2**30,
              enable_prefix_caching=enable_prefix_caching)  # fmt: skip
    try:
        outs = []
        for round_ in range(2):  # the second round finds what the first left (or evicted)
            for question in QUESTIONS:
                prefix = SYSTEM if round_ == 0 or len(question) % 2 else SYSTEM.upper()
                outs.append(llm.generate([prefix + "\nQ: " + question + "\nA:"], GREEDY)[0])
        return outs, settled_stats(llm)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def cached_and_uncached():
    # ~20 blocks per prompt, 48 blocks in all: cached blocks get evicted between requests.
    return run(True, 48), run(False, 48)


def test_same_greedy_output_with_and_without_prefix_caching(cached_and_uncached):
    (cached, _), (uncached, _) = cached_and_uncached
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in uncached]


def test_hits_are_counted_and_reported(cached_and_uncached):
    (cached, stats), (uncached, stats_off) = cached_and_uncached
    assert cached[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 16 * 15 for o in cached[1:6])
    assert all(o.num_cached_tokens == 0 for o in uncached)
    assert stats.prefix_cache_hits == sum(o.num_cached_tokens for o in cached)
    assert stats.prefix_cache_queries == sum(len(o.prompt_token_ids) for o in cached)
    assert stats_off.prefix_cache_hits == 0
    assert stats.kv_cache_usage == 0 and stats.num_blocks_in_use == 0


def cached_tokens(base_url: str, model: str, salt: str | None) -> int:
    body = {"model": model, "prompt": SYSTEM + "\nQ: Where is the cafe?\nA:", "max_tokens": 2}
    if salt is not None:
        body["cache_salt"] = salt
    resp = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_salt_separates_tenants(server):
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    assert httpx.post(server.base_url + "/reset_prefix_cache").status_code == 200
    assert cached_tokens(server.base_url, model, "tenant-a") == 0
    assert cached_tokens(server.base_url, model, "tenant-a") > 0
    assert cached_tokens(server.base_url, model, "tenant-b") == 0
    assert cached_tokens(server.base_url, model, None) == 0
    assert cached_tokens(server.base_url, model, None) > 0
