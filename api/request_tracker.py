"""One HTTP request's metrics: latency histograms as its deltas stream out, totals at its end,
and (with `--enable-log-requests`) one JSON record of it.

An HTTP request is one or more engine requests (a /v1/completions batch: one per prompt;
`src` numbers them); token histograms and `request_params_n` count engine requests,
`request_success` counts samples, the latency histograms count HTTP requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from actors.protocol import TextDelta
from api.streaming import Accumulator

if TYPE_CHECKING:
    from api.metrics import ServingMetrics


class RequestTracker:
    """Times one HTTP request's deltas; `finish` records its totals once."""

    def __init__(
        self,
        metrics: ServingMetrics,
        model_name: str,
        request_id: str,
        feature: str,
        n: int,
        log_line: Callable[[dict], None] | None = None,
        served_model: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.model_name = model_name
        self.served_model = served_model or model_name  # a LoRA request: its adapter's name
        self.request_id = request_id
        self.feature = feature
        self.n = n
        self.log_line = log_line
        self.arrival = time.monotonic()
        self.ttft: float | None = None
        self.last: dict[tuple[int, int], float] = {}
        self.sources_seen: set[int] = set()
        self.done = False

    def on_delta(self, src: int, delta: TextDelta) -> None:
        now = time.monotonic()
        m, name = self.metrics, self.model_name
        key = (src, delta.index)
        if self.ttft is None:
            self.ttft = now - self.arrival
            m.ttft.labels(name).observe(self.ttft)
        elif key in self.last and delta.token_ids:
            m.itl.labels(name).observe(now - self.last[key])
            m.tpot.labels(name).observe(now - self.last[key])
        self.last[key] = now
        if src not in self.sources_seen:
            self.sources_seen.add(src)
            m.queue_time.labels(name).observe(delta.queue_seconds)

    def finish(self, acc: Accumulator | None) -> None:
        if self.done or acc is None:
            return
        self.done = True
        e2e = time.monotonic() - self.arrival
        m, name, feature = self.metrics, self.model_name, self.feature
        m.e2e.labels(name).observe(e2e)
        usage = acc.usage()
        m.prompt_tokens.labels(name, feature).inc(usage["prompt_tokens"])
        m.generation_tokens.labels(name, feature).inc(usage["completion_tokens"])
        m.add_gpu_seconds(self.served_model, usage["gpu_seconds"])
        for choice in acc.choices:
            m.request_success.labels(name, choice.finish_reason or "abort").inc()
        for src in sorted(self.sources_seen):
            m.request_prompt_tokens.labels(name).observe(acc.prompt_tokens[src])
            m.request_generation_tokens.labels(name).observe(acc.source_output_tokens(src))
            m.request_params_n.labels(name).observe(self.n)
        if self.log_line is not None:
            self.log_line(self.record(acc, usage, e2e))

    def record(self, acc: Accumulator, usage: dict, e2e: float) -> dict:
        """The finished request as one log record (never the prompt or the output text)."""
        reasons = sorted({c.finish_reason or "abort" for c in acc.choices})
        return {
            "request_id": self.request_id,
            "feature": self.feature,
            "model": self.model_name,
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "gpu_seconds": usage["gpu_seconds"],
            "ttft_s": None if self.ttft is None else round(self.ttft, 6),
            "e2e_s": round(e2e, 6),
            "finish_reason": reasons[0] if len(reasons) == 1 else reasons,
        }
