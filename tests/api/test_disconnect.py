"""A client that goes away aborts its engine requests, streamed or not."""

from __future__ import annotations

import asyncio
import json

import pytest

HEADERS = {"Content-Type": "application/json"}


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10}),
    ("/v1/completions", {"prompt": ["Hi", "Ho", [1, 2]], "max_tokens": 10, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 3}),
], ids=["one", "batch", "chat-n"])  # fmt: skip
async def test_streamed_disconnect_aborts(app, engine, path, body):
    engine.delay = 0.01
    async with app.test_client().request(path, method="POST", headers=HEADERS) as conn:
        await conn.send(json.dumps({**body, "stream": True}).encode())
        await conn.send_complete()
        chunk = await conn.receive()
        assert chunk.startswith(b"data: {")
        assert conn.status_code == 200
        await conn.disconnect()
    requests = [c["request_id"] for c in engine.calls]
    await wait_for(lambda: sorted(engine.aborted) == sorted(requests))
    assert engine.finished == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": ["Hi", "Ho"], "max_tokens": 10}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])  # fmt: skip
async def test_non_streamed_disconnect_aborts(app, engine, path, body):
    engine.delay = 0.02
    async with app.test_client().request(path, method="POST", headers=HEADERS) as conn:
        await conn.send(json.dumps(body).encode())
        await conn.send_complete()
        await wait_for(lambda: len(engine.calls) > 0)
        await asyncio.sleep(0.05)  # some deltas produced, far from done
        await conn.disconnect()
    requests = [c["request_id"] for c in engine.calls]
    await wait_for(lambda: sorted(engine.aborted) == sorted(requests))
    assert engine.finished == []


async def test_refused_prompt_in_batch_aborts_the_others(client, engine):
    resp = await client.post("/v1/completions",
                             json={"prompt": ["Hi", "word " * 600], "max_tokens": 10})  # fmt: skip
    assert resp.status_code == 400
    first = engine.calls[0]["request_id"]
    assert engine.aborted == [first] and engine.finished == []


async def test_finished_requests_are_not_aborted(client, engine):
    for stream in (False, True):
        resp = await client.post(
            "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3, "stream": stream}
        )
        await resp.get_data()
    assert engine.aborted == [] and len(engine.finished) == 4
