"""/v1/stats (fake engine, a fake clock): rates and hit rates over the rate window, latency
quantiles from the histograms' buckets over the latency window, GPU-seconds by model."""

from __future__ import annotations

import math

import msgspec
import pytest

import api.stats_view as stats_view
from api.metrics import ServingMetrics
from api.server import ServerConfig, create_app
from api.stats_view import LATENCY_WINDOW_S, RATE_WINDOW_S, Buckets, StatsHistory
from tests.api.fake_engine import EMPTY_STATS

INF = math.inf


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ((0, 10, 10), 0.5, 0.15),  # all in (0.1, 0.2]: halfway through it
        ((4, 8, 10), 0.5, 0.125),  # rank 5 of 10: a quarter into (0.1, 0.2]
        ((4, 8, 10), 0.95, 0.2),  # rank 9.5 falls in +Inf: the highest finite bound
        ((10, 10, 10), 0.95, 0.095),  # in the first bucket: from 0
        ((0, 0, 0), 0.5, None),
    ],
)
def test_quantiles_interpolate_like_prometheus(counts, q, expected):
    got = Buckets((0.1, 0.2, INF), counts).quantile(q)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_a_window_is_the_difference_of_two_samples():
    now, before = Buckets((0.1, INF), (7, 9)), Buckets((0.1, INF), (5, 5))
    assert now.minus(before) == Buckets((0.1, INF), (2, 4))
    assert now.minus(None) == now


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(stats_view.time, "monotonic", clock)
    return clock


def stats(**fields):
    return msgspec.structs.replace(EMPTY_STATS, **fields)


def test_rates_are_over_the_rate_window(engine, clock):
    history = StatsHistory(engine, ServingMetrics(engine))
    first = history.view()
    assert first["throughput"] == {"prompt_tokens_per_s": None, "generation_tokens_per_s": None}
    for second in range(1, 31):  # 3 tokens a second, 2 prefix queries with 1 hit each second
        clock.now += 1
        engine.stats = stats(generation_tokens=3 * second, prompt_tokens_computed=20 * second,
                             prefix_cache_queries=2 * second, prefix_cache_hits=second)  # fmt: skip
        history.record(history.read())
    clock.now += 0.5
    engine.stats = stats(
        generation_tokens=120, prompt_tokens_computed=600,
        prefix_cache_queries=70, prefix_cache_hits=30, num_running=2,
    )  # fmt: skip
    view = history.view()
    # baseline: the sample RATE_WINDOW_S + 0.5 s ago, of second b
    b, elapsed = 30 - int(RATE_WINDOW_S), RATE_WINDOW_S + 0.5
    assert view["throughput"]["generation_tokens_per_s"] == pytest.approx((120 - 3 * b) / elapsed)
    assert view["throughput"]["prompt_tokens_per_s"] == pytest.approx((600 - 20 * b) / elapsed)
    assert view["prefix_cache"]["hit_rate"] == pytest.approx((30 - b) / (70 - 2 * b))
    assert view["prefix_cache"]["hit_rate_total"] == pytest.approx(30 / 70)
    assert view["requests"] == {"running": 2, "waiting": 0}
    assert view["tokens"] == {"prompt": 600, "generation": 120}


def test_samples_are_kept_for_the_latency_window_only(engine, clock):
    history = StatsHistory(engine, ServingMetrics(engine))
    for _ in range(200):
        history.record(history.read())
        clock.now += 0.5  # twice a second: every other one is kept
    kept = [s.time for s in history.samples]
    assert all(b - a >= 1.0 for a, b in zip(kept, kept[1:], strict=False))
    assert kept[-1] - kept[0] <= LATENCY_WINDOW_S + 1
    assert clock.now - 0.5 - kept[1] < LATENCY_WINDOW_S  # the oldest still needed is kept


def test_latency_quantiles_cover_the_latency_window(engine, clock):
    metrics = ServingMetrics(engine)
    history = StatsHistory(engine, metrics)
    ttft = metrics.ttft.labels("fake-model")
    for _ in range(10):
        ttft.observe(3.0)  # slow, long ago: outside the window below
    history.record(history.read())
    clock.now += LATENCY_WINDOW_S
    for _ in range(10):
        ttft.observe(0.03)  # in (0.02, 0.04]
    view = history.view()["latency"]
    assert view["ttft_s"]["count"] == 10
    assert view["ttft_s"]["p50"] == pytest.approx(0.03)
    assert 0.02 < view["ttft_s"]["p95"] <= 0.04
    assert view["itl_s"] == {"p50": None, "p95": None, "count": 0}


async def test_gpu_seconds_by_feature_and_by_served_model(engine):
    engine.lora_adapters = {"french": "/adapters/french"}
    real_delta = engine.delta
    engine.delta = lambda *a: msgspec.structs.replace(real_delta(*a), gpu_seconds=0.25)
    engine.stats = stats(gpu_seconds_by_feature={"search": 1.5, "none": 0.5})
    client = create_app(engine, ServerConfig()).test_client()
    for model in ("french", "french", "fake-model"):
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    resp = await client.get("/v1/stats")
    view = await resp.get_json()
    assert view["gpu_seconds"] == {
        "by_feature": {"none": 0.5, "search": 1.5},
        "by_model": {"fake-model": 0.25, "french": 0.5},
    }
    assert view["model"] == "fake-model" and view["object"] == "engine.stats"
