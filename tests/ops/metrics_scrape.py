"""Reading a server's /metrics: samples by name and labels, and differences between scrapes."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base_url: str) -> Samples:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `tokenmill:<name>` over the samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == "tokenmill:" + name and set(labels.items()) <= set(sample_labels)
    )


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def settled(base_url: str, timeout: float = 20.0) -> Samples:
    """A scrape once the engine is idle and its counters stopped moving."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now = scrape(base_url)
        busy = total(now, "num_requests_running") + total(now, "num_requests_waiting")
        if not busy and now == last:
            return now
        last = now
        time.sleep(0.3)
    raise TimeoutError("metrics did not settle")
