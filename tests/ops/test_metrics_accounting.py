"""After a known set of requests (two features, streamed and not), every counter and
histogram count on /metrics matches what the responses reported, and usage.gpu_seconds
sums to the per-feature GPU-seconds counter."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.ops.metrics_scrape import delta, scrape, settled, total

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


def chat(base_url: str, body: dict, headers: dict | None = None) -> dict:
    """A chat completion; streamed ones are read to the end and return their usage chunk."""
    if not body.get("stream"):
        resp = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120)  # fmt: skip
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]
    body = {**body, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=120) as resp:  # fmt: skip
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    return chunks[-1]["usage"]


def test_counters_and_histograms_match_the_responses(server, model_id):
    base = server.base_url
    before = settled(base)
    requests = [  # (feature, body, headers)
        ("alpha", {"max_tokens": 7, "metadata": {"feature": "alpha"}}, None),
        ("alpha", {"max_tokens": 5, "n": 2, "metadata": {"feature": "alpha"}}, None),
        ("beta", {"max_tokens": 6, "stream": True}, {"X-Feature": "beta"}),
        # the header wins over metadata (nginx sets it per API key)
        (
            "beta",
            {"max_tokens": 4, "stream": True, "metadata": {"feature": "alpha"}},
            {"X-Feature": "beta"},
        ),  # fmt: skip
        ("invalid", {"max_tokens": 3, "metadata": {"feature": "no spaces allowed"}}, None),
        ("none", {"max_tokens": 3}, None),
    ]
    usages = []
    for feature, body, headers in requests:
        body = {"model": model_id, "messages": MESSAGES, "ignore_eos": True, **body}
        usages.append((feature, body.get("n", 1), body["max_tokens"], chat(base, body, headers)))
    after = settled(base)

    for feature in ("alpha", "beta", "invalid", "none"):
        mine = [u for f, _, _, u in usages if f == feature]
        prompt = sum(u["prompt_tokens"] for u in mine)
        generated = sum(u["completion_tokens"] for u in mine)
        gpu = sum(u["gpu_seconds"] for u in mine)
        assert delta(before, after, "prompt_tokens_total", feature=feature) == prompt
        assert delta(before, after, "generation_tokens_total", feature=feature) == generated
        assert gpu > 0
        charged = delta(before, after, "request_gpu_seconds_total", feature=feature)
        assert charged == pytest.approx(gpu, rel=1e-9, abs=1e-12), feature

    choices = sum(n for _, n, _, _ in usages)
    outputs = [u["completion_tokens"] for *_, u in usages]
    assert outputs == [n * m for _, n, m, _ in usages]  # ignore_eos: every sample ran to the end
    assert delta(before, after, "request_success_total", finished_reason="length") == choices
    assert delta(before, after, "request_success_total") == choices
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "request_queue_time_seconds", "request_params_n",
                 "request_prompt_tokens", "request_generation_tokens"):  # fmt: skip
        assert delta(before, after, name + "_count") == len(requests), name
    assert delta(before, after, "request_params_n_sum") == choices
    prompts = sum(u["prompt_tokens"] for *_, u in usages)
    assert delta(before, after, "request_prompt_tokens_sum") == prompts
    assert delta(before, after, "request_generation_tokens_sum") == sum(outputs)
    # one delta per token: every token after a sample's first is one inter-token gap
    gaps = sum(m - 1 for _, n, m, _ in usages for _ in range(n))
    assert delta(before, after, "inter_token_latency_seconds_count") == gaps
    assert delta(before, after, "time_per_output_token_seconds_count") == gaps
    # every computed token was in some step: the uncached prompt once, each sample's fed-back
    # outputs, and the fork's recomputed last prompt token (n=2)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for *_, u in usages)
    forks = sum(n - 1 for _, n, _, _ in usages)
    computed = prompts - cached + sum(outputs) - choices + forks
    assert delta(before, after, "iteration_tokens_total_sum") == computed


def test_aliases_health_and_labels(server):
    now = scrape(server.base_url)
    assert total(now, "engine_healthy") == 1
    assert total(now, "gpu_cache_usage_perc") == total(now, "kv_cache_usage_perc")
    queries = total(now, "prefix_cache_queries_total")
    hits = total(now, "prefix_cache_hits_total")
    assert queries > 0
    assert total(now, "gpu_prefix_cache_hit_rate") == pytest.approx(hits / queries)
    ours = [labels for (name, labels) in now if name.startswith("tokenmill:")]
    assert ours and all("model_name" in dict(labels) for labels in ours)
