"""A response's output items, built from the model's text as it streams in.

`OutputBuilder` feeds the text to the request's tool parser (when it has one) and keeps
the output items, `message` (one `output_text` part) and `function_call`, in the order the
model wrote them; every step also returns the semantic stream events it makes (without
`sequence_number`, which the stream adds). The non-streamed response is the same builder
fed the whole text with its events dropped, so streamed and non-streamed output agree.
"""

from __future__ import annotations

import uuid
from typing import Any

from api.streaming import Accumulator
from api.tool_calls import ChoiceToolCalls
from api.tools import ToolPlan

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """Output items of one response. NOTE: a message item stays open while text comes and
    is closed (its done events sent) before a function call or the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.reader = ChoiceToolCalls(plan) if plan.parser is not None else None
        self.items: list[dict[str, Any]] = []
        self.open_message: dict[str, Any] | None = None

    def feed(self, text: str) -> list[Event]:
        if self.reader is None:
            return self._text(text) if text else []
        return self._events(self.reader.feed(text))

    def finish(self, complete: bool) -> list[Event]:
        """The last events; `complete` False: the output was cut (a message is incomplete)."""
        events = self._events(self.reader.finish()) if self.reader is not None else []
        if not self.items:
            events += self._open()  # NOTE: an empty output is still one (empty) message
        return events + self._close(complete)

    def _events(self, items: list) -> list[Event]:
        events: list[Event] = []
        for item in items:
            events += self._text(item) if isinstance(item, str) else self._call(item)
        return events

    def _text(self, text: str) -> list[Event]:
        events = self._open() if self.open_message is None else []
        part = self.open_message["content"][0]
        part["text"] += text
        index = len(self.items) - 1
        return events + [_text_event("delta", self.open_message, index, delta=text)]

    def _open(self) -> list[Event]:
        item_id = new_id("msg")
        self.open_message = {
            "id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
            "content": [],
        }  # fmt: skip
        self.items.append(self.open_message)
        index = len(self.items) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = {"type": "response.output_item.added", "output_index": index,
                 "item": _copy(self.open_message)}  # fmt: skip
        self.open_message["content"].append(part)
        part_added = {"type": "response.content_part.added", "item_id": item_id,
                      "output_index": index, "content_index": 0, "part": dict(part)}  # fmt: skip
        return [added, part_added]

    def _close(self, complete: bool = True) -> list[Event]:
        message, self.open_message = self.open_message, None
        if message is None:
            return []
        index = self.items.index(message)
        message["status"] = "completed" if complete else "incomplete"
        part = message["content"][0]
        return [
            _text_event("done", message, index, text=part["text"]),
            {"type": "response.content_part.done", "item_id": message["id"],
             "output_index": index, "content_index": 0, "part": dict(part)},
            {"type": "response.output_item.done", "output_index": index, "item": _copy(message)},
        ]  # fmt: skip

    def _call(self, call: dict[str, Any]) -> list[Event]:
        events = self._close()
        fn = call["function"]
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call["id"], "name": fn["name"], "arguments": ""}  # fmt: skip
        self.items.append(item)
        index = len(self.items) - 1
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": dict(item)})  # fmt: skip
        item.update(arguments=fn["arguments"], status="completed")
        where = {"item_id": item["id"], "output_index": index}
        return events + [
            {"type": "response.function_call_arguments.delta", **where, "delta": fn["arguments"]},
            {"type": "response.function_call_arguments.done", **where, "name": fn["name"],
             "arguments": fn["arguments"]},
            {"type": "response.output_item.done", "output_index": index, "item": dict(item)},
        ]  # fmt: skip


def _text_event(kind: str, message: dict[str, Any], index: int, **fields: Any) -> Event:
    return {"type": f"response.output_text.{kind}", "item_id": message["id"],
            "output_index": index, "content_index": 0, **fields, "logprobs": []}  # fmt: skip


def _copy(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "content": [dict(p) for p in message["content"]]}


def output_text(items: list[dict[str, Any]]) -> str:
    """The SDKs' `output_text`: every output_text part, joined."""
    return "".join(
        part["text"]
        for item in items
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def usage(acc: Accumulator) -> dict[str, Any]:
    """The Responses usage object (with tokenmill's `gpu_seconds`) of the chat usage."""
    chat = acc.usage()
    cached = chat["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": chat["prompt_tokens"],
        # NOTE: cache_write_tokens (the newer SDKs require it) is OpenAI's paid cache; 0 here
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat["total_tokens"],
        "gpu_seconds": chat["gpu_seconds"],
    }


def status_of(finish_reason: str | None) -> tuple[str, dict | None, dict | None]:
    """(status, incomplete_details, error) of the engine's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}, None
    if finish_reason in ("stop", "tool_calls"):
        return "completed", None, None
    error = {"code": "server_error", "message": "The generation was aborted."}
    return "failed", None, error
