"""Real nginx (ops/nginx/tokenmill.conf) in front of the real server: SSE streams chunk by
chunk, a client abort frees the request, a burst over the rate limit gets 429s in OpenAI's
error shape."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx

from .test_ops_files import free_port, nginx_bin, nginx_conf  # noqa: F401 (nginx_bin: fixture)


@contextlib.contextmanager
def nginx_running(
    nginx: str, tmp_path: Path, backend: int, edit: Callable[[str], str] = lambda s: s
) -> Iterator[str]:
    """nginx with the shipped site (after `edit`) in front of 127.0.0.1:`backend`; its URL."""
    port = free_port()
    conf = nginx_conf(tmp_path, port, backend)
    site = tmp_path / "site.conf"
    site.write_text(edit(site.read_text()))
    cmd = [nginx, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "nginx did not listen within 10 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def set_limit(site: str, zone: str, rate: str, burst: int) -> str:
    """The site with `zone`'s rate and burst replaced (the shipped ones are too high to trip)."""
    site = re.sub(rf"(zone={zone}:\S+ rate=)\S+;", rf"\g<1>{rate};", site)
    return re.sub(rf"(limit_req zone={zone} burst=)\d+", rf"\g<1>{burst}", site)


def assert_rate_limit_error(resp: httpx.Response) -> None:
    assert resp.status_code == 429
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "RateLimitError" and error["code"] == "rate_limit_exceeded"
    assert error["param"] is None and error["message"]


def chat(model: str, max_tokens: int, **extra) -> dict:
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **extra}


def first_model(base_url: str) -> str:
    return httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return float(re.search(rf"^tokenmill:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M).group(1))


def test_chat_streams_through_nginx_chunk_by_chunk(nginx_bin, tmp_path, server):  # noqa: F811
    model = first_model(server.base_url)
    with nginx_running(nginx_bin, tmp_path, server.port) as url:
        body = chat(model, 32, ignore_eos=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [
                (line[5:].strip(), time.monotonic())
                for line in resp.iter_lines()
                if line.startswith("data:")
            ]
    assert events[-1][0] == "[DONE]" and len(events) >= 10
    stamps = [t for _, t in events[:-1]]
    gaps = [b - a for a, b in pairwise(stamps)]
    # NOTE: buffered, the events would arrive together at the end, microseconds apart
    assert stamps[-1] - stamps[0] > 0.1
    assert sum(g > 0.002 for g in gaps) >= len(gaps) // 2, gaps


def test_client_abort_through_nginx_frees_the_request(nginx_bin, tmp_path, server):  # noqa: F811
    model = first_model(server.base_url)
    with nginx_running(nginx_bin, tmp_path, server.port) as url:
        body = chat(model, 1500, ignore_eos=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            for _ in range(3):
                while not next(lines).startswith("data:"):
                    pass
            assert gauge(server.base_url, "num_requests_running") >= 1
            assert gauge(server.base_url, "kv_cache_usage_perc") > 0
        # leaving the block closes the connection: nginx closes its upstream one
        deadline = time.monotonic() + 10
        while gauge(server.base_url, "num_requests_running") or gauge(
            server.base_url, "kv_cache_usage_perc"
        ):
            assert time.monotonic() < deadline, "the aborted request still runs after 10 s"
            time.sleep(0.2)


def test_burst_over_the_rate_limit_gets_json_429s(nginx_bin, tmp_path, server):  # noqa: F811
    edit = lambda site: set_limit(site, "tokenmill_ip", "2r/s", 10)  # noqa: E731
    with nginx_running(nginx_bin, tmp_path, server.port, edit) as url:
        with ThreadPoolExecutor(60) as pool:
            resps = list(pool.map(lambda _: httpx.get(url + "/v1/models", timeout=30), range(60)))
    ok = [r for r in resps if r.status_code == 200]
    limited = [r for r in resps if r.status_code != 200]
    assert len(ok) >= 11 and limited, [r.status_code for r in resps]  # burst 10 + 1 pass at once
    assert all(r.json()["data"] for r in ok)
    for resp in limited:
        assert_rate_limit_error(resp)


def test_the_console_and_its_stats_pass_and_metrics_do_not(nginx_bin, tmp_path, server):  # noqa: F811
    with nginx_running(nginx_bin, tmp_path, server.port) as url:
        for path in ("/", "/ui", "/ui/console.js", "/ui/console.css"):
            direct = httpx.get(server.base_url + path, timeout=10)
            proxied = httpx.get(url + path, timeout=10)
            assert proxied.status_code == 200, path
            assert proxied.content == direct.content, path
            assert proxied.headers["content-security-policy"].startswith("default-src 'self'")
            assert proxied.headers["content-type"] == direct.headers["content-type"]
        stats = httpx.get(url + "/v1/stats", timeout=10)
        assert stats.status_code == 200 and stats.json()["object"] == "engine.stats"
        assert httpx.get(url + "/metrics", timeout=10).status_code == 404
        assert httpx.get(server.base_url + "/metrics", timeout=10).status_code == 200
