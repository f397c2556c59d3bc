"""ops/grafana: the dashboard's queries name the engine's series and are valid PromQL, its
variables are defined, its panel ids unique; the provisioning files fit it."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from .test_ops_files import ENGINE_SERIES, OPS, tokenmill_names
from .test_prometheus import promtool  # noqa: F401 (fixture)

GRAFANA = OPS / "grafana"
DASHBOARD = GRAFANA / "tokenmill-dashboard.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_panels_name_engine_series():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    used = set()
    for title, expr in queries(dash):
        names = tokenmill_names(expr)
        assert names and names <= ENGINE_SERIES, (title, names - ENGINE_SERIES)
        used |= names
    assert {
        "generation_tokens_total", "prompt_tokens_total", "num_requests_running",
        "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
        "prefix_cache_queries_total", "num_preemptions_total", "request_gpu_seconds_total",
        "engine_healthy", "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
    } <= used  # fmt: skip
    cost = [e for _, e in queries(dash) if "$price_per_gpu_hour" in e]
    assert cost and all("sum by (feature)" in e and "request_gpu_seconds_total" in e for e in cost)


def test_dashboard_variables_are_defined():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    used = set(re.findall(r"\$\{?(\w+)", DASHBOARD.read_text()))
    assert {"datasource", "instance", "price_per_gpu_hour"} <= used
    assert {u for u in used if not u.startswith("__")} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["price_per_gpu_hour"]["type"] in ("textbox", "custom")
    float(variables["price_per_gpu_hour"]["query"])
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):  # noqa: F811
    values = {"$instance": ".*", "$__rate_interval": "1m", "$price_per_gpu_hour": "2.5"}
    rules = []
    for i, (_, expr) in enumerate(queries(dashboard())):
        for var, value in values.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}:check", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    cmd = [promtool, "check", "rules", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in out, out


def test_provisioning_fits_the_dashboard():
    dashboards = yaml.safe_load((GRAFANA / "provisioning/dashboards/tokenmill.yml").read_text())
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert dashboards["apiVersion"] == sources["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert {s["type"] for s in sources["datasources"]} == {variable["query"]} == {"prometheus"}
