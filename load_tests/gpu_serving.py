"""Serving over HTTP for the GPU suite: start-up seconds to a healthy /health, then token-id
requests at Poisson rates (TTFT and ITL percentiles from `bench_serving`)."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time

import httpx
from bench_serving import send_one, summarize
from servers import REPO, tokenmill_cmd, wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def poisson_run(base: str, rate: float, n: int, in_len: int, out_len: int, seed: int):
    """`n` streamed completions, arrivals a Poisson process of `rate` req/s."""
    rng = random.Random(seed)
    url = f"{base}/v1/completions"
    bodies = [
        {
            "prompt": [rng.randrange(10, 1000) for _ in range(in_len)],
            "max_tokens": out_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(n)
    ]
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await send_one(client, url, {**bodies[0], "max_tokens": 2})  # warm-up
        tasks, t0 = [], time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(send_one(client, url, body)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return summarize(list(results), time.perf_counter() - t0, n, out_len)


def serve_and_measure(
    flags: list[str], rates: list[float], n: int, in_len: int, out_len: int, timeout: float
) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    server = subprocess.Popen(
        tokenmill_cmd(port, *flags), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out: dict = {}
    try:
        wait_healthy(base, server, min(timeout, 300), "tokenmill")
        out["startup_s"] = round(time.monotonic() - t0, 2)
        for i, rate in enumerate(rates):
            s = asyncio.run(poisson_run(base, rate, n, in_len, out_len, seed=i))
            out[f"rate_{rate:g}"] = {
                "completed": s["completed"],
                "failed": s["failed"],
                "errors": s["errors"],
                "ttft_ms": s["ttft_ms"],
                "itl_ms": s["itl_ms"],
                "output_tok_per_s": s["output_throughput"],
            }
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return out
