"""ops/prometheus: promtool accepts the config and the rule files, and the rules' unit tests
(tests.yml) pass; without promtool, the files still parse and name only the engine's series."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from .test_ops_files import ENGINE_SERIES, OPS, load_yaml, prometheus_rules, tokenmill_names

PROM = OPS / "prometheus"


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_checks_config_and_rules(promtool):
    rule_files = load_yaml("prometheus.yml")["rule_files"]
    out = run(promtool, "check", "config", "prometheus.yml")
    assert f"SUCCESS: {len(rule_files)} rule files found" in out
    for name in rule_files:
        assert "SUCCESS" in run(promtool, "check", "rules", name)


def test_commented_kubernetes_job_relabels_to_the_annotated_port():
    # NOTE: not via promtool: Debian's Prometheus is built without Kubernetes discovery
    text = (PROM / "prometheus.yml").read_text()
    commented = text.split("# On Kubernetes", 1)[1].split("\n", 1)[1]
    (job,) = yaml.safe_load(re.sub(r"(?m)^  # ", "  ", commented))
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    joined = ";".join(["10.1.2.3:9999", "8000"])  # __address__;the prometheus.io/port annotation
    match = re.fullmatch(address["regex"], joined)  # NOTE: Prometheus anchors its regexes
    assert match.expand(address["replacement"].replace("$", "\\")) == "10.1.2.3:8000"


def test_promtool_rule_unit_tests_pass(promtool):
    tests = load_yaml("tests.yml")
    assert set(tests["rule_files"]) == set(load_yaml("prometheus.yml")["rule_files"])
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert {"TokenmillEngineDead", "TokenmillKVCacheHigh"} <= firing
    assert "SUCCESS" in run(promtool, "test", "rules", "tests.yml")


def test_rules_parse_and_name_engine_series():
    rules = prometheus_rules()
    recorded = {r["record"].removeprefix("tokenmill:") for r in rules if "record" in r}
    assert "feature_gpu_seconds:rate5m" in recorded
    for name in recorded:
        assert name.count(":") == 1, name  # level:metric:operation
    for rule in rules:
        assert tokenmill_names(rule["expr"]) <= ENGINE_SERIES | recorded, rule
    for test in load_yaml("tests.yml")["tests"]:
        for series in test["input_series"]:
            name = series["series"].split("{")[0]
            assert name == "up" or tokenmill_names(name) <= ENGINE_SERIES, name
    assert yaml.safe_load((PROM / "tokenmill-alerts.yml").read_text())["groups"]
