"""Prometheus metrics, named `tokenmill:<vLLM's name>` with vLLM's `model_name` label.

Engine gauges and counters are read from the engine's latest `SchedulerStats` at scrape time;
request-level counters and histograms are observed by the API as deltas stream out.
Every app has its own CollectorRegistry (no global state).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from actors.protocol import TextDelta
from api.streaming import Accumulator
from model_runner.grammar_cache import GrammarCacheStats

PREFIX = "tokenmill:"
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class EngineStatsCollector:
    """Scheduler gauges and counters, from `engine.stats` (zeros before the first report)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        labels = [str(self.engine.model_name)]

        def gauge(name: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge(
            "num_requests_running",
            "Requests in the running batch.",
            stats.num_running if stats else 0,
        )
        yield gauge(
            "num_requests_waiting",
            "Requests waiting to be scheduled.",
            stats.num_waiting if stats else 0,
        )
        yield gauge(
            "kv_cache_usage_perc",
            "KV-cache blocks held by live requests (0 to 1).",
            stats.kv_cache_usage if stats else 0.0,
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries if stats else 0,
        )
        yield counter(
            "prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            stats.prefix_cache_hits if stats else 0,
        )
        yield counter(
            "num_preemptions", "Preemptions by recompute.", stats.num_preemptions if stats else 0
        )
        grammar = stats.grammar if stats and stats.grammar else GrammarCacheStats()
        yield counter(
            "grammar_compiles", "Grammars compiled (cache misses, failures included).",
            grammar.compiles,
        )  # fmt: skip
        yield counter(
            "grammar_compile_seconds", "Seconds spent compiling grammars.",
            grammar.compile_seconds,
        )  # fmt: skip
        yield counter(
            "grammar_cache_hits", "Grammar requests served from the compiled-grammar cache.",
            grammar.cache_hits,
        )  # fmt: skip
        yield gauge(
            "grammar_cache_bytes", "Memory of the cached compiled grammars.", grammar.cache_bytes
        )


class ServingMetrics:
    """The app's registry: engine stats plus request counters and latency histograms."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine))
        reg, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prefill tokens processed.", label, registry=reg
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", label, registry=reg
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished samples.",
            label + ["finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            label,
            registry=reg,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between deltas.",
            label,
            registry=reg,
            buckets=ITL_BUCKETS,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Request latency.",
            label,
            registry=reg,
            buckets=E2E_BUCKETS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self, str(self.engine.model_name))


class RequestTracker:
    """Times one HTTP request's deltas; `finish` records its totals once."""

    def __init__(self, metrics: ServingMetrics, model_name: str) -> None:
        self.metrics = metrics
        self.model_name = model_name
        self.arrival = time.monotonic()
        self.last: dict[tuple[int, int], float] = {}
        self.first_seen = False
        self.done = False

    def on_delta(self, src: int, delta: TextDelta) -> None:
        now = time.monotonic()
        key = (src, delta.index)
        if not self.first_seen:
            self.first_seen = True
            self.metrics.ttft.labels(self.model_name).observe(now - self.arrival)
        elif key in self.last and delta.token_ids:
            self.metrics.itl.labels(self.model_name).observe(now - self.last[key])
        self.last[key] = now

    def finish(self, acc: Accumulator | None) -> None:
        if self.done or acc is None:
            return
        self.done = True
        m, name = self.metrics, self.model_name
        m.e2e.labels(name).observe(time.monotonic() - self.arrival)
        m.prompt_tokens.labels(name).inc(sum(acc.prompt_tokens))
        m.generation_tokens.labels(name).inc(sum(c.num_output_tokens for c in acc.choices))
        for choice in acc.choices:
            m.request_success.labels(name, choice.finish_reason or "abort").inc()
