"""The "nothing lost" invariant, checked after every fault test: once traffic stops, no KV
block is held, nothing runs or waits, every actor's request table is empty (as its
heartbeat reports), and a canary request is answered."""

from __future__ import annotations

import time

import httpx

from tests.ops.metrics_scrape import Samples, scrape, total

ACTORS = ("api", "tokenizer", "scheduler", "executor", "detokenizer")


def by_actor(samples: Samples, name: str) -> dict[str, float]:
    """`tokenmill:<name>` by its `actor` label."""
    return {
        dict(labels)["actor"]: value
        for (sample, labels), value in samples.items()
        if sample == "tokenmill:" + name
    }


def leaks(samples: Samples) -> list[str]:
    found = [f"{m} = {total(samples, m)}"
             for m in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
             if total(samples, m)]  # fmt: skip
    tables = by_actor(samples, "actor_open_requests")
    found += [f"actor {a}: no heartbeat state" for a in ACTORS if a not in tables]
    found += [f"actor {a} holds {n:g} requests" for a, n in tables.items() if n]
    return found


def assert_nothing_lost(base_url: str, timeout: float = 15.0) -> None:
    """Wait for the idle state (heartbeats come every second), then answer a canary."""
    deadline = time.monotonic() + timeout
    while (found := leaks(scrape(base_url))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not found, found
    model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    resp = httpx.post(
        base_url + "/v1/completions",
        json={"model": model, "prompt": "The capital of France is", "max_tokens": 4},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
