"""ops/: the alerts name series that /metrics exports; nginx accepts the site and streams SSE
unbuffered; systemd accepts the unit."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

OPS = Path(__file__).resolve().parents[2] / "ops"


def exported_series() -> set[str]:
    """Every series name the API's /metrics exports (without the `tokenmill:` prefix)."""
    from prometheus_client import generate_latest

    from api.metrics import ServingMetrics

    engine = SimpleNamespace(stats=None, model_name="m", health=lambda: (True, ""),
                             actor_states=dict)  # fmt: skip
    text = generate_latest(ServingMetrics(engine).registry).decode()
    series = set()
    for name, kind in re.findall(r"^# TYPE tokenmill:(\S+) (\S+)$", text, re.M):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        base = name.removesuffix("_total") if kind == "counter" else name
        series |= {base + s for s in suffixes.get(kind, [""])}
    return series


# NOTE: the series the engine side exports (issue 12): the dashboards and rules are checked
# against this list; test_alert_rules_name_real_metrics_and_jobs checks it against /metrics.
ENGINE_GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "engine_healthy", "gpu_cache_usage_perc", "gpu_prefix_cache_hit_rate"]  # fmt: skip
ENGINE_COUNTERS = ["prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                   "prompt_tokens", "generation_tokens", "request_success",
                   "request_gpu_seconds"]  # fmt: skip
ENGINE_HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
                     "time_per_output_token_seconds", "e2e_request_latency_seconds",
                     "request_queue_time_seconds", "request_prompt_tokens",
                     "request_generation_tokens", "iteration_tokens_total",
                     "request_params_n"]  # fmt: skip
ENGINE_SERIES = {
    *ENGINE_GAUGES,
    *(c + "_total" for c in ENGINE_COUNTERS),
    *(h + s for h in ENGINE_HISTOGRAMS for s in ("_bucket", "_sum", "_count")),
}


def tokenmill_names(expr: str) -> set[str]:
    """The `tokenmill:` series an expression names (recorded `level:metric:op` names whole)."""
    return set(re.findall(r"tokenmill:([a-zA-Z0-9_:]+)", expr))


def load_yaml(name: str) -> dict:
    return yaml.safe_load((OPS / "prometheus" / name).read_text())


def prometheus_rules() -> list[dict]:
    """Every rule (recording and alerting) of the rule files prometheus.yml loads."""
    files = [OPS / "prometheus" / f for f in load_yaml("prometheus.yml")["rule_files"]]
    assert files and all(f.is_file() for f in files)
    return [r for f in files for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_name_real_metrics_and_jobs():
    prom = load_yaml("prometheus.yml")
    jobs = {job["job_name"] for job in prom["scrape_configs"]}
    rules = prometheus_rules()
    alerts = [r for r in rules if "alert" in r]
    recorded = {r["record"].removeprefix("tokenmill:") for r in rules if "record" in r}
    assert len(alerts) >= 4
    series = exported_series()
    assert {"num_requests_waiting", "kv_cache_usage_perc", "request_success_total"} <= series
    assert sorted(ENGINE_SERIES - series) == [], "the engine side does not export these yet"
    for rule in alerts:
        assert rule["for"] and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    for rule in rules:
        names = tokenmill_names(rule["expr"])
        assert names <= series | recorded, (rule.get("alert") or rule["record"], names)
        assert set(re.findall(r'job="([^"]+)"', rule["expr"])) <= jobs
    used = {n for r in alerts for n in tokenmill_names(r["expr"])}
    assert {"num_requests_waiting", "kv_cache_usage_perc", "engine_healthy"} <= used


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = (OPS / "tokenmill.service").read_text()
    assert "ExecStart=/opt/tokenmill/.venv/bin/tokenmill serve " in text
    unit = tmp_path / "tokenmill.service"
    # NOTE: verify wants an existing executable; everything else is checked as written
    unit.write_text(text.replace("/opt/tokenmill/.venv/bin/tokenmill", sys.executable))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_conf(tmp_path: Path, listen: int, backend: int) -> Path:
    site = (OPS / "nginx" / "tokenmill.conf").read_text()
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    site = site.replace("listen [::]:80;", "").replace("127.0.0.1:8000", f"127.0.0.1:{backend}")
    (tmp_path / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {tmp_path}/site.conf;\n}}\n"
    )
    return conf


@pytest.fixture
def nginx_bin() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip("nginx is not installed")
    return path


def test_nginx_accepts_the_site(nginx_bin, tmp_path):
    conf = nginx_conf(tmp_path, free_port(), 8000)
    proc = subprocess.run(
        [nginx_bin, "-t", "-c", str(conf), "-p", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


class SSEHandler(http.server.BaseHTTPRequestHandler):
    """Three server-sent events, 0.4 s apart."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(3):
            self.wfile.write(f"data: {i}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.4)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


def test_nginx_streams_sse_unbuffered(nginx_bin, tmp_path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SSEHandler)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    conf = nginx_conf(tmp_path, port, backend.server_address[1])
    proc = subprocess.Popen(
        [nginx_bin, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
    )
    try:
        stamps = read_events_through(f"http://127.0.0.1:{port}/v1/chat/completions", proc)
    finally:
        proc.terminate()
        proc.wait(10)
        backend.shutdown()
    assert [e for e, _ in stamps] == ["0", "1", "2", "[DONE]"]
    assert stamps[-1][1] - stamps[0][1] > 0.7  # NOTE: buffered, all would arrive at once


def read_events_through(url: str, proc: subprocess.Popen) -> list[tuple[str, float]]:
    deadline = time.monotonic() + 10
    while True:
        try:
            with httpx.stream("POST", url, json={}, timeout=10) as resp:
                assert resp.status_code == 200
                return [
                    (line[5:].strip(), time.monotonic())
                    for line in resp.iter_lines()
                    if line.startswith("data:")
                ]
        except httpx.ConnectError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
