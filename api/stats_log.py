"""The engine's periodic log line (vLLM's): throughput, queue, KV usage, prefix-cache hits.

Written every `interval` seconds while the engine is busy (requests running or waiting, or
tokens processed since the last line); `--disable-log-stats` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("tokenmill.stats")

STATS_LOG_INTERVAL_S = 10.0


class StatsLine:
    """Rates between two SchedulerStats snapshots."""

    def __init__(self) -> None:
        self.last = None
        self.last_time = time.monotonic()

    def line(self, stats) -> str | None:
        """The log line for `stats`, or None when the engine was idle since the last one."""
        now = time.monotonic()
        last, elapsed = self.last, max(now - self.last_time, 1e-9)
        self.last, self.last_time = stats, now
        if stats is None:
            return None
        prompt = stats.prompt_tokens_computed - (last.prompt_tokens_computed if last else 0)
        generation = stats.generation_tokens - (last.generation_tokens if last else 0)
        if not (prompt or generation or stats.num_running or stats.num_waiting):
            return None
        queries = stats.prefix_cache_queries - (last.prefix_cache_queries if last else 0)
        hits = stats.prefix_cache_hits - (last.prefix_cache_hits if last else 0)
        hit_rate = 100.0 * hits / queries if queries else 0.0
        text = (
            f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {generation / elapsed:.1f} tokens/s, "
            f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {100.0 * stats.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {hit_rate:.1f}%"
        )
        if stats.spec is not None:
            spec, before = stats.spec, last.spec if last is not None else None
            drafted = spec.num_draft_tokens - (before.num_draft_tokens if before else 0)
            accepted = spec.num_accepted_tokens - (before.num_accepted_tokens if before else 0)
            rate = 100.0 * accepted / drafted if drafted else 0.0
            text += f", Spec decode acceptance: {rate:.1f}% of {drafted} draft tokens"
        return text


async def log_engine_stats(engine, interval: float) -> None:
    """Log `engine.stats` every `interval` seconds while busy, until cancelled."""
    stats_line = StatsLine()
    stats_line.line(engine.stats)
    while True:
        await asyncio.sleep(interval)
        text = stats_line.line(engine.stats)
        if text is not None:
            log.info(text)
