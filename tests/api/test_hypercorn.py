"""The app on a real hypercorn socket (fake engine): SSE over the wire, disconnect -> abort."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import pytest_asyncio

from api.lifecycle import serve_app
from api.server import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(loop_scope="function")  # NOTE: the test's own loop
async def base_url(engine):
    cfg = ServerConfig(port=free_port())
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(create_app(engine, cfg), cfg, stop))
    url = f"http://127.0.0.1:{cfg.port}"
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url + "/health")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
    yield url
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_stream_over_socket_then_disconnect(base_url, engine):
    engine.delay = 0.02
    body = {"prompt": "Hi", "max_tokens": 10, "stream": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in resp.headers
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen == 2:
                    break
        for _ in range(250):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert engine.aborted == [engine.calls[0]["request_id"]]
        # the server still answers, streamed to the end with [DONE]
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) == 11


async def test_refusal_status_over_socket(base_url):
    body = {"prompt": "word " * 600, "stream": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "max_tokens"


async def test_openai_sdk_parses_every_shape(base_url, tokenizer):
    import openai

    from tests.api.fake_engine import FakeEngine

    expected = tokenizer.decode(tokenizer.encode(FakeEngine.OUTPUT, add_special_tokens=False)[:5])
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    [model] = (await client.models.list()).data
    messages = [{"role": "user", "content": "Hi"}]
    chat = await client.chat.completions.create(model=model.id, messages=messages, max_tokens=5)
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    stream = await client.chat.completions.create(
        model=model.id, messages=messages, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 5
    comp = await client.completions.create(model=model.id, prompt="Hi", max_tokens=5, n=2)
    assert [c.text for c in comp.choices] == [expected, expected]
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=model.id, prompt="Hi", temperature=9)
    assert err.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="Hi")
    await client.close()


async def _read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before it closed; a reset (our late bytes hit a closed socket)
    is a close too. Not closed within `timeout` raises TimeoutError."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def test_slow_and_oversized_clients_are_cut_off(engine, monkeypatch):
    """Slowloris headers: closed at the keep-alive timeout (a connection is idle until its
    headers are complete); a slow body: 408 at the body timeout; headers over the cap:
    refused. The server answers others meanwhile."""
    import api.lifecycle
    import api.server

    monkeypatch.setattr(api.lifecycle, "HYPERCORN_KEEP_ALIVE_S", 1.0)
    monkeypatch.setattr(api.server, "BODY_TIMEOUT_S", 1.0)
    cfg = ServerConfig(port=free_port())
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(create_app(engine, cfg), cfg, stop))
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
                break
            except OSError:
                await asyncio.sleep(0.02)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        start = asyncio.get_running_loop().time()
        for _ in range(16):  # a header byte every 0.5 s: never complete
            await asyncio.sleep(0.5)
            if reader.at_eof() or reader.exception() is not None:  # closed, or reset
                break
            writer.write(b"X")
        assert await _read_until_closed(reader, 5) == b""
        assert asyncio.get_running_loop().time() - start < 7  # 1 s, on a busy machine

        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
        assert (await _read_until_closed(reader, 10)).startswith(b"HTTP/1.1 408")

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}") as client:
            for headers in ({"X-Big": "a" * 20000}, {f"X-{i}": "1" for i in range(120)}):
                resp = await client.get("/health", headers=headers)
                assert resp.status_code == 431 and "error" in resp.json()

        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{cfg.port}/health")).status_code == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
