"""Operator-facing pieces of the API process: feature labels, the stats log line, the
graceful-shutdown state machine."""

from __future__ import annotations

import asyncio
import logging

import pytest

from actors.protocol import SchedulerStats
from api.features import FeatureTags
from api.lifecycle import GracefulShutdown
from api.stats_log import StatsLine, log_engine_stats


def test_feature_labels_are_checked_and_bounded():
    tags = FeatureTags(max_tags=2)
    assert tags.label(None, None) == "none"
    assert tags.label("", {"feature": ""}) == "none"
    assert tags.label(None, {"feature": "search.v2:eu-1"}) == "search.v2:eu-1"
    assert tags.label("header", {"feature": "metadata"}) == "header"  # the header wins
    assert tags.label(None, {"feature": "has space"}) == "invalid"
    assert tags.label("x" * 65, None) == "invalid"
    assert tags.label("x" * 64, None) == "other"  # valid, but past the bound of 2
    assert tags.label("header", None) == "header"  # already seen: still its own label
    assert tags.label("none", None) == "none" and len(tags.seen) == 2


def stats(prompt: int, generation: int, running: int = 0, waiting: int = 0, queries: int = 0,
          hits: int = 0) -> SchedulerStats:  # fmt: skip
    return SchedulerStats(
        num_running=running, num_waiting=waiting, kv_cache_usage=0.25, num_blocks_in_use=4,
        prefix_cache_queries=queries, prefix_cache_hits=hits, num_preemptions=0,
        prompt_tokens_computed=prompt, generation_tokens=generation,
    )  # fmt: skip


def test_stats_line_reports_rates_only_while_busy(monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 130.0])
    monkeypatch.setattr("api.stats_log.time.monotonic", lambda: next(clock))
    line = StatsLine()  # t=100
    assert line.line(stats(0, 0)) is None  # t=110: idle
    text = line.line(stats(500, 200, running=3, waiting=1, queries=100, hits=25))  # t=120
    assert text == (
        "Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
        "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%"
    )
    assert line.line(stats(500, 200)) is None  # t=130: nothing moved, nothing queued


async def test_stats_log_task_logs_while_busy(caplog):
    class Engine:
        stats = stats(0, 0)

    engine = Engine()
    caplog.set_level(logging.INFO, logger="tokenmill.stats")
    task = asyncio.create_task(log_engine_stats(engine, 0.05))
    await asyncio.sleep(0.12)
    assert not caplog.records  # idle
    engine.stats = stats(10, 10, running=1)
    await asyncio.sleep(0.12)
    task.cancel()
    assert any("Running: 1 reqs" in r.message for r in caplog.records)


class FakeEngine:
    def __init__(self) -> None:
        self.streams = {"a": None, "b": None}
        self.ready = asyncio.Event()
        self.ready.set()
        self.events: list[str] = []

    def drain(self) -> None:
        self.events.append("drain")

    def abort_all(self) -> None:
        self.events.append("abort_all")
        self.streams.clear()

    async def wait_idle(self, timeout: float) -> bool:
        await asyncio.sleep(min(timeout, 0.05))
        return not self.streams


@pytest.mark.parametrize("finish_in_time", [True, False])
async def test_first_signal_drains_then_aborts_at_the_timeout(finish_in_time):
    engine = FakeEngine()
    shutdown = GracefulShutdown(engine, timeout=0.2)
    task = asyncio.create_task(shutdown.drain())
    shutdown.on_signal()
    await asyncio.sleep(0.01)
    assert engine.events == ["drain"] and not shutdown.stop.is_set()
    if finish_in_time:
        engine.streams.clear()
    await asyncio.wait_for(task, 2)
    assert shutdown.stop.is_set()
    assert engine.events == (["drain"] if finish_in_time else ["drain", "abort_all"])


async def test_second_signal_stops_at_once():
    engine = FakeEngine()
    shutdown = GracefulShutdown(engine, timeout=60)
    task = asyncio.create_task(shutdown.drain())
    shutdown.on_signal()
    await asyncio.sleep(0.01)
    shutdown.on_signal()
    assert shutdown.stop.is_set() and engine.events == ["drain", "abort_all"]
    task.cancel()
