"""Prometheus metrics, named `tokenmill:<vLLM's name>` with vLLM's `model_name` label.

Engine gauges and counters are read from the engine's latest `SchedulerStats` at scrape time
(the scheduler's process counts them, so they hold across processes); request-level counters
and histograms are observed by the API as deltas stream out (`api/request_tracker.py`).
The older vLLM names that deployed dashboards still use are exported as aliases:
`gpu_cache_usage_perc` (= `kv_cache_usage_perc`), `time_per_output_token_seconds` (= the
inter-token latency) and `gpu_prefix_cache_hit_rate` (cumulative hits / queries).
Every app has its own CollectorRegistry (no global state).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from actors.protocol import SchedulerStats
from api.request_tracker import RequestTracker
from model_runner.grammar_cache import GrammarCacheStats

PREFIX = "tokenmill:"
# vLLM's buckets
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # 1 .. 500000
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def _family(kind, name: str, doc: str, labels: list[str], values: dict[tuple, float]) -> Metric:
    family = kind(PREFIX + name, doc, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


class EngineStatsCollector:
    """Scheduler gauges and counters, from `engine.stats` (zeros before the first report),
    and the engine's health."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats or SchedulerStats(
            num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks_in_use=0,
            prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
        )  # fmt: skip
        name = (str(self.engine.model_name),)

        def gauge(metric: str, doc: str, value: float) -> Metric:
            return _family(GaugeMetricFamily, metric, doc, ["model_name"], {name: value})

        def counter(metric: str, doc: str, value: float) -> Metric:
            return _family(CounterMetricFamily, metric, doc, ["model_name"], {name: value})

        healthy, _ = self.engine.health()
        yield gauge(
            "engine_healthy",
            "1 while every engine process is alive and taking requests, else 0 (starting, "
            "dead or hung actor, shutting down). Alert on this, not on `up`.",
            1.0 if healthy else 0.0,
        )
        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        kv_doc = "KV-cache blocks held by live requests (0 to 1)."
        yield gauge("kv_cache_usage_perc", kv_doc, stats.kv_cache_usage)
        yield gauge("gpu_cache_usage_perc", "Alias of kv_cache_usage_perc. " + kv_doc,
                    stats.kv_cache_usage)  # fmt: skip
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      queries)  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", hits)
        yield gauge(
            "gpu_prefix_cache_hit_rate",
            "Alias (older vLLM): prefix_cache_hits / prefix_cache_queries since start.",
            hits / queries if queries else 0.0,
        )
        yield counter("num_preemptions", "Preemptions by recompute.", stats.num_preemptions)
        yield _family(
            CounterMetricFamily,
            "request_gpu_seconds",
            "Device seconds of every step, split among its requests by their share of its "
            "tokens, by feature label.",
            ["model_name", "feature"],
            {(*name, f): s for f, s in sorted(stats.gpu_seconds_by_feature.items())},
        )
        yield from _grammar_metrics(stats.grammar or GrammarCacheStats(), counter, gauge)
        if stats.spec is not None:
            yield from _spec_metrics(name, stats.spec, counter)
        yield from _actor_metrics(name, self.engine.actor_states())


def _spec_metrics(name: tuple[str], spec, counter) -> Iterator[Metric]:
    yield counter("spec_decode_num_drafts", "Speculative proposals verified.", spec.num_drafts)
    yield counter("spec_decode_num_draft_tokens", "Speculative tokens proposed.",
                  spec.num_draft_tokens)  # fmt: skip
    yield counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted.",
                  spec.num_accepted_tokens)  # fmt: skip
    yield _family(
        CounterMetricFamily,
        "spec_decode_num_accepted_tokens_per_pos",
        "Proposals whose token at this position (0-based) was accepted.",
        ["model_name", "position"],
        {(*name, str(i)): n for i, n in enumerate(spec.accepted_per_pos)},
    )


def _actor_metrics(name: tuple[str], states: dict) -> Iterator[Metric]:
    labels = ["model_name", "actor"]
    yield _family(
        GaugeMetricFamily,
        "actor_open_requests",
        "Requests each actor still holds state for (engine actors: as of their last "
        "heartbeat); all 0 when idle.",
        labels,
        {(*name, actor): s.open_requests for actor, s in states.items()},
    )
    yield _family(
        CounterMetricFamily,
        "bus_rejected_messages",
        "Internal-bus messages an actor's inbox dropped as malformed (never fatal).",
        labels,
        {(*name, actor): s.rejected_messages for actor, s in states.items()},
    )


def _grammar_metrics(grammar: GrammarCacheStats, counter, gauge) -> Iterator[Metric]:
    yield counter("grammar_compiles", "Grammars compiled (cache misses, failures included).",
                  grammar.compiles)  # fmt: skip
    yield counter("grammar_compile_seconds", "Seconds spent compiling grammars.",
                  grammar.compile_seconds)  # fmt: skip
    yield counter("grammar_cache_hits", "Grammar requests served from the compiled-grammar cache.",
                  grammar.cache_hits)  # fmt: skip
    yield gauge("grammar_cache_bytes", "Memory of the cached compiled grammars.",
                grammar.cache_bytes)  # fmt: skip


class ServingMetrics:
    """The app's registry: engine stats plus request counters and latency histograms."""

    def __init__(self, engine) -> None:
        self.engine = engine
        # NOTE: per served model (the base or a LoRA adapter), added as each request ends;
        # the per-feature split is the scheduler's, per step (SchedulerStats)
        self.gpu_seconds_by_model: dict[str, float] = {}
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine))
        model, feature = ["model_name"], ["model_name", "feature"]

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, model, registry=self.registry, buckets=buckets)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.",
                                     feature)  # fmt: skip
        self.generation_tokens = counter("generation_tokens", "Tokens generated.", feature)
        self.request_success = counter("request_success", "Finished samples.",
                                       model + ["finished_reason"])  # fmt: skip
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS)  # fmt: skip
        self.itl = histogram("inter_token_latency_seconds", "Time between deltas.", ITL_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Alias (older vLLM) of inter_token_latency_seconds.",
                              ITL_BUCKETS)  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to first scheduled, per engine request.",
                                    E2E_BUCKETS)  # fmt: skip
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens per engine request.",
                                               TOKEN_COUNT_BUCKETS)  # fmt: skip
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per engine request.",
                                                   TOKEN_COUNT_BUCKETS)  # fmt: skip
        self.request_params_n = histogram("request_params_n", "The `n` of each engine request.",
                                          N_BUCKETS)  # fmt: skip
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens per engine step.",
                                          ITERATION_TOKEN_BUCKETS)  # fmt: skip

    def observe_stats(self, stats: SchedulerStats) -> None:
        """Every SchedulerStats the engine sends: its finished steps' token counts."""
        if stats.iteration_tokens:
            histogram = self.iteration_tokens.labels(str(self.engine.model_name))
            for tokens in stats.iteration_tokens:
                histogram.observe(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(
        self, request_id: str, feature: str, n: int, log_line=None, served_model: str | None = None
    ) -> RequestTracker:
        """A tracker for one HTTP request; `log_line` takes its finished record (a dict);
        `served_model` is the adapter it asked for (default: the base model)."""
        name = str(self.engine.model_name)
        return RequestTracker(self, name, request_id, feature, n, log_line, served_model)

    def add_gpu_seconds(self, served_model: str, seconds: float) -> None:
        by_model = self.gpu_seconds_by_model
        by_model[served_model] = by_model.get(served_model, 0.0) + seconds
