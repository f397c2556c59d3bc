"""`GET /v1/stats`: a small JSON view of the engine's numbers, for the web console's dashboard.

Read from what the server keeps anyway: the engine's latest `SchedulerStats` (cumulative
counters, gauges) and the Prometheus latency histograms. Rates and latency quantiles are
taken over recent windows, between the current numbers and a sample of them from about a
window ago; samples are taken once a second by a background task (and by the endpoint), so
nothing is added to the request or step path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import Histogram

from actors.protocol import SchedulerStats

SAMPLE_INTERVAL_S = 1.0
RATE_WINDOW_S = 5.0  # throughput and the prefix-cache hit rate
LATENCY_WINDOW_S = 60.0  # TTFT and ITL quantiles

_NO_STATS = SchedulerStats(
    num_running=0, num_waiting=0, kv_cache_usage=0.0, num_blocks_in_use=0,
    prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
)  # fmt: skip


@dataclass(frozen=True)
class Buckets:
    """A histogram's cumulative bucket counts at one time; `bounds` ends with +Inf."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    def minus(self, earlier: Buckets | None) -> Buckets:
        if earlier is None or earlier.bounds != self.bounds:
            return self
        deltas = zip(self.counts, earlier.counts, strict=True)
        return Buckets(self.bounds, tuple(a - b for a, b in deltas))

    @property
    def total(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def quantile(self, q: float) -> float | None:
        """Prometheus's `histogram_quantile`: linear within the bucket holding rank q; in the
        +Inf bucket, the highest finite bound. None without observations."""
        if self.total <= 0:
            return None
        rank = q * self.total
        lower, below = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return lower
                if count == below:
                    return bound
                return lower + (bound - lower) * (rank - below) / (count - below)
            lower, below = bound, count
        return lower


def histogram_buckets(histogram: Histogram) -> Buckets:
    """The histogram's buckets summed over its label values (one model per server)."""
    by_bound: dict[float, float] = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + sample.value
    bounds = tuple(sorted(by_bound))
    return Buckets(bounds, tuple(by_bound[b] for b in bounds))


@dataclass(frozen=True)
class Sample:
    """The cumulative numbers at one (monotonic) time."""

    time: float
    stats: SchedulerStats
    ttft: Buckets
    itl: Buckets


def _rate(now: Sample, base: Sample | None, field: str) -> float | None:
    if base is None or now.time <= base.time:
        return None
    return (getattr(now.stats, field) - getattr(base.stats, field)) / (now.time - base.time)


def _latency(now: Buckets, base: Buckets | None) -> dict:
    window = now.minus(base)
    return {"p50": window.quantile(0.5), "p95": window.quantile(0.95), "count": int(window.total)}


class StatsHistory:
    """Samples of the last LATENCY_WINDOW_S (one a second) and the view built from them."""

    def __init__(self, engine, metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.samples: deque[Sample] = deque()

    def read(self) -> Sample:
        return Sample(
            time=time.monotonic(),
            stats=self.engine.stats or _NO_STATS,
            ttft=histogram_buckets(self.metrics.ttft),
            itl=histogram_buckets(self.metrics.itl),
        )

    def record(self, sample: Sample) -> None:
        """Keep `sample` if the newest kept one is a sample interval old; drop expired ones."""
        if self.samples and sample.time - self.samples[-1].time < SAMPLE_INTERVAL_S:
            return
        self.samples.append(sample)
        while len(self.samples) > 1 and sample.time - self.samples[1].time >= LATENCY_WINDOW_S:
            self.samples.popleft()

    def baseline(self, now: float, window: float) -> Sample | None:
        """The newest kept sample at least `window` old, else the oldest one before `now`."""
        older = [s for s in self.samples if s.time < now]
        if not older:
            return None
        due = [s for s in older if now - s.time >= window]
        return due[-1] if due else older[0]

    def view(self) -> dict:
        now = self.read()
        self.record(now)
        rates_base = self.baseline(now.time, RATE_WINDOW_S)
        latency_base = self.baseline(now.time, LATENCY_WINDOW_S)
        stats = now.stats
        queries = hits = None
        if rates_base is not None:
            queries = stats.prefix_cache_queries - rates_base.stats.prefix_cache_queries
            hits = stats.prefix_cache_hits - rates_base.stats.prefix_cache_hits
        total_queries = stats.prefix_cache_queries
        return {
            "object": "engine.stats",
            "model": str(self.engine.model_name),
            "time": time.time(),
            "window_s": {"rates": RATE_WINDOW_S, "latency": LATENCY_WINDOW_S},
            "requests": {"running": stats.num_running, "waiting": stats.num_waiting},
            "kv_cache": {"usage": stats.kv_cache_usage, "blocks_in_use": stats.num_blocks_in_use},
            "prefix_cache": {
                "queries": total_queries,
                "hits": stats.prefix_cache_hits,
                "hit_rate": hits / queries if queries else None,
                "hit_rate_total": stats.prefix_cache_hits / total_queries
                if total_queries
                else None,
            },
            "throughput": {
                "prompt_tokens_per_s": _rate(now, rates_base, "prompt_tokens_computed"),
                "generation_tokens_per_s": _rate(now, rates_base, "generation_tokens"),
            },
            "tokens": {
                "prompt": stats.prompt_tokens_computed,
                "generation": stats.generation_tokens,
            },
            "latency": {
                "ttft_s": _latency(now.ttft, latency_base and latency_base.ttft),
                "itl_s": _latency(now.itl, latency_base and latency_base.itl),
            },
            "preemptions": stats.num_preemptions,
            "gpu_seconds": {
                "by_feature": dict(sorted(stats.gpu_seconds_by_feature.items())),
                "by_model": dict(sorted(self.metrics.gpu_seconds_by_model.items())),
            },
        }

    async def sample_every_second(self) -> None:
        """Record a sample each SAMPLE_INTERVAL_S until cancelled (the windows' baselines)."""
        while True:
            self.record(self.read())
            await asyncio.sleep(SAMPLE_INTERVAL_S)
