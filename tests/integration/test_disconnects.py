"""Client disconnects abort their requests: KV blocks in use return to 0."""

from __future__ import annotations

import asyncio
import random
import re
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"


def metric(text: str, name: str) -> float:
    match = re.search(rf"^tokenmill:{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    assert match, f"metric {name} missing"
    return float(match.group(1))


async def streamed_then_dropped(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {"model": MODEL, "prompt": f"Story number {rng.randint(0, 10**6)}:",
            "max_tokens": 300, "ignore_eos": True, "stream": True}  # fmt: skip
    keep = rng.randint(1, 20)
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                keep -= 1
                if keep == 0:
                    break  # leaving the block closes the connection mid-stream


async def non_streamed_then_dropped(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {"model": MODEL, "prompt": "Tell me everything about rivers.",
            "max_tokens": 400, "ignore_eos": True}  # fmt: skip
    try:
        await client.post("/v1/completions", json=body, timeout=rng.uniform(0.2, 2.0))
    except httpx.TimeoutException:
        pass


async def drive(base_url: str) -> None:
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        jobs = []
        for i in range(24):
            job = streamed_then_dropped if i % 3 else non_streamed_then_dropped
            jobs.append(job(client, rng))
        await asyncio.gather(*jobs)


def test_disconnects_free_every_block(server):
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    assert model == MODEL
    asyncio.run(drive(server.base_url))
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(server.base_url + "/metrics").text
        running = metric(text, "num_requests_running")
        usage = metric(text, "kv_cache_usage_perc")
        if (running, usage) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert running == 0
    assert metric(text, "num_requests_waiting") == 0
    assert usage == 0
    assert httpx.get(server.base_url + "/health").status_code == 200
    # And the server still answers.
    resp = httpx.post(server.base_url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "Hi", "max_tokens": 3})  # fmt: skip
    assert resp.status_code == 200
