"""The Responses API's stream: OpenAI's semantic events, numbered by `sequence_number`.

`response.created`, `response.in_progress`, the output builder's item, part, text and
argument events, then `response.completed` (or `response.incomplete` / `response.failed`).
Each SSE event carries its type as `event:` and the JSON as `data:`; there is no `[DONE]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from actors.protocol import TextDelta
from api.responses_output import Event, OutputBuilder
from api.streaming import Accumulator

_encode = msgspec.json.Encoder().encode

FINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}


def named_sse(event: Event) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + _encode(event) + b"\n\n"


class ResponsesStreamer:
    """Deltas of one engine request -> numbered events. `finished(builder, acc)` makes the
    final response body (and stores it when asked)."""

    def __init__(
        self,
        in_progress: dict[str, Any],
        acc: Accumulator,
        builder: OutputBuilder,
        finished: Callable[[OutputBuilder, Accumulator], dict[str, Any]],
    ) -> None:
        self.in_progress = in_progress
        self.acc = acc
        self.builder = builder
        self.finished = finished
        self.sequence_number = 0

    def _numbered(self, events: list[Event]) -> list[Event]:
        for event in events:
            event["sequence_number"] = self.sequence_number
            self.sequence_number += 1
        return events

    def start(self) -> list[Event]:
        return self._numbered(
            [
                {"type": "response.created", "response": self.in_progress},
                {"type": "response.in_progress", "response": self.in_progress},
            ]
        )

    def on_delta(self, src: int, delta: TextDelta) -> list[Event]:
        self.acc.add(src, delta, keep=False)
        return self._numbered(self.builder.feed(delta.text))

    def finish(self) -> list[Event]:
        complete = self.acc.choices[0].finish_reason != "length"
        events = self.builder.finish(complete)
        body = self.finished(self.builder, self.acc)
        return self._numbered([*events, {"type": FINAL_EVENTS[body["status"]], "response": body}])

    def failed(self, error: dict[str, Any]) -> list[Event]:
        detail = error["error"]
        body = {**self.in_progress, "status": "failed",
                "error": {"code": str(detail["code"]), "message": detail["message"]}}  # fmt: skip
        return self._numbered([{"type": "response.failed", "response": body}])
