"""nginx (ops/nginx/tokenmill.conf) in front of a header-echoing backend: the feature tag per
API key replaces the client's X-Feature, the per-key and connection limits answer JSON 429s;
and the site's upstream keep-alive is shorter than hypercorn's."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api import lifecycle

from .test_nginx_server import assert_rate_limit_error, nginx_running, set_limit
from .test_ops_files import OPS, nginx_bin  # noqa: F401 (nginx_bin: fixture)

SITE = OPS / "nginx" / "tokenmill.conf"


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """GET: the request's headers as JSON ({name: [values]}), after `?sleep=S` seconds."""

    def do_GET(self) -> None:  # noqa: N802
        if m := re.search(r"sleep=([\d.]+)", self.path):
            time.sleep(float(m.group(1)))
        names = {k.lower() for k in self.headers}
        body = json.dumps({k: self.headers.get_all(k) for k in names}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo_port():
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    yield backend.server_address[1]
    backend.shutdown()


def example_keys(site: str) -> dict[str, str]:
    """The commented examples of the feature map: {Authorization value: feature}."""
    block = re.search(r"map \$http_authorization \$tokenmill_feature \{(.*?)\n\}", site, re.S)
    return dict(re.findall(r'^\s*#\s*"([^"]+)"\s+(\S+);', block.group(1), re.M))


def uncomment_examples(site: str) -> str:
    return re.sub(r'^(\s*)#\s*("Bearer [^"]+"\s+\S+;)', r"\1\2", site, flags=re.M)


def test_feature_tag_replaces_the_clients_own(nginx_bin, tmp_path, echo_port):  # noqa: F811
    keys = example_keys(SITE.read_text())
    assert keys, "the map has no commented examples"
    key, feature = next(iter(keys.items()))
    with nginx_running(nginx_bin, tmp_path, echo_port, uncomment_examples) as url:

        def seen(**headers) -> dict:
            return httpx.get(url + "/v1/models", headers=headers, timeout=10).json()

        assert seen(Authorization=key, **{"X-Feature": "forged"})["x-feature"] == [feature]
        assert "x-feature" not in seen(Authorization="Bearer unknown", **{"X-Feature": "forged"})
        assert "x-feature" not in seen(**{"X-Feature": "forged"})


def burst(url: str, n: int, **headers) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: httpx.get(url, headers=headers, timeout=30), range(n)))


def test_per_key_limit_counts_each_key(nginx_bin, tmp_path, echo_port):  # noqa: F811
    def edit(site: str) -> str:
        site = set_limit(site, "tokenmill_ip", "1000r/s", 1000)
        return set_limit(site, "tokenmill_key", "1r/s", 5)

    with nginx_running(nginx_bin, tmp_path, echo_port, edit) as url:
        keyed = burst(url + "/v1/models", 30, Authorization="Bearer key-a")
        other = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer key-b"})
        anonymous = burst(url + "/v1/models", 30)
    limited = [r for r in keyed if r.status_code != 200]
    assert limited and sum(r.status_code == 200 for r in keyed) >= 6  # burst 5 + 1
    for resp in limited:
        assert_rate_limit_error(resp)
    assert other.status_code == 200  # another key has its own budget
    assert [r.status_code for r in anonymous] == [200] * 30  # no key: not counted per key


def test_connection_limit_answers_json_429(nginx_bin, tmp_path, echo_port):  # noqa: F811
    def edit(site: str) -> str:
        return site.replace("limit_conn tokenmill_conn_ip 64;", "limit_conn tokenmill_conn_ip 2;")

    with nginx_running(nginx_bin, tmp_path, echo_port, edit) as url:
        resps = burst(url + "/v1/models?sleep=1", 8)
    assert sum(r.status_code == 200 for r in resps) >= 2
    limited = [r for r in resps if r.status_code != 200]
    assert len(limited) >= 4, [r.status_code for r in resps]
    for resp in limited:
        assert_rate_limit_error(resp)


def test_shipped_limits_and_upstream_keepalive(monkeypatch):
    site = SITE.read_text()
    for line in (
        "limit_req_zone $binary_remote_addr zone=tokenmill_ip:10m rate=20r/s;",
        "limit_req_zone $http_authorization zone=tokenmill_key:10m rate=50r/s;",
        "limit_req zone=tokenmill_ip burst=40 nodelay;",
        "limit_conn tokenmill_conn_ip 64;",
        "proxy_set_header X-Feature $tokenmill_feature;",
    ):
        assert line in site, line
    upstream = re.search(r"upstream tokenmill \{(.*?)\n\}", site, re.S).group(1)
    timeout = re.search(r"^\s*keepalive_timeout (\d+)s;", upstream, re.M)
    assert float(timeout.group(1)) < lifecycle.HYPERCORN_KEEP_ALIVE_S
    # and serve_app gives hypercorn that keep-alive
    seen = {}

    async def fake_serve(app, config, shutdown_trigger):
        seen["keep_alive"] = config.keep_alive_timeout

    monkeypatch.setattr("hypercorn.asyncio.serve", fake_serve)
    cfg = type("Cfg", (), {"host": "127.0.0.1", "port": 0})
    asyncio.run(lifecycle.serve_app(None, cfg, asyncio.Event()))
    assert seen["keep_alive"] == lifecycle.HYPERCORN_KEEP_ALIVE_S
