"""ops/kubernetes: the container's args are `tokenmill serve` flags, its probes and scrape
path are routes the app serves, the grace period outlasts the drain, the Service and the
PodDisruptionBudget select the pods."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from types import SimpleNamespace

import pytest
import yaml

from api.cli import build_parser
from api.server import create_app

from .test_ops_files import OPS

# NOTE: flags issue 12's engine side adds to `tokenmill serve`; until it merges they are
# checked here by name only, afterwards by the parser like every other flag.
ASSUMED_FLAGS = {"--shutdown-timeout"}


def manifests() -> dict[str, dict]:
    files = sorted((OPS / "kubernetes").glob("*.yaml"))
    docs = [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def pod() -> dict:
    return manifests()["Deployment"]["spec"]["template"]


def container() -> dict:
    (only,) = pod()["spec"]["containers"]
    return only


def serve_flags() -> set[str]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(commands.choices["serve"]._option_string_actions)


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return value


def test_container_args_are_serve_flags():
    c = container()
    assert c["command"] == ["tokenmill", "serve"]
    args = c["args"]
    unknown = {a.split("=")[0] for a in args if a.startswith("--")} - serve_flags()
    assert unknown <= ASSUMED_FLAGS, unknown
    known = [a for a in args if a.split("=")[0] not in unknown]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            ns = build_parser().parse_args(["serve", *known])
        except SystemExit:
            pytest.fail(f"tokenmill serve rejects the args: {err.getvalue()}")
    (port,) = c["ports"]
    assert (ns.host, ns.port) == ("0.0.0.0", port["containerPort"])
    assert ns.device == "cuda" and ns.model_tag.startswith(c["volumeMounts"][0]["mountPath"])
    if "--shutdown-timeout" not in unknown:
        assert ns.shutdown_timeout == float(flag(args, "--shutdown-timeout"))


def test_grace_period_outlasts_prestop_and_drain():
    c = container()
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and 2 <= int(sleep[1]) <= 15
    drain = float(flag(c["args"], "--shutdown-timeout"))
    assert pod()["spec"]["terminationGracePeriodSeconds"] > int(sleep[1]) + drain + 5


def test_probes_and_scrape_path_are_served_routes():
    c = container()
    (port,) = c["ports"]
    engine = SimpleNamespace(stats=None, model_name="m", tokenizer=None, health=lambda: (True, ""),
                             draining=False, stats_listeners=[], actor_states=dict)  # fmt: skip
    client = create_app(engine).test_client()
    probes = [c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])

    async def status(path: str) -> int:
        return (await client.get(path)).status_code

    for probe in probes:
        assert probe["httpGet"]["port"] in (port["name"], port["containerPort"])
        assert asyncio.run(status(probe["httpGet"]["path"])) == 200
    assert asyncio.run(status(annotations["prometheus.io/path"])) == 200
    engine.health = lambda: (False, "scheduler died")
    for probe in probes:
        assert asyncio.run(status(probe["httpGet"]["path"])) == 503  # dead engine: not ready
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load


def test_gpu_service_and_disruption_budget_fit_the_pods():
    docs = manifests()
    c = container()
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["nvidia.com/gpu"] == 1
    labels = pod()["metadata"]["labels"]
    deployment = docs["Deployment"]["spec"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    (port,) = c["ports"]
    assert {p["targetPort"] for p in service["ports"]} <= {port["name"], port["containerPort"]}
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] < deployment["replicas"]
