"""One choice's tool calls in OpenAI's shapes: read by the request's parser from its text.

The non-streamed response feeds a choice's whole text at once, the stream feeds it delta by
delta; the parser gives the same calls either way (see `api.tool_parsers.base`), so the two
agree on calls, arguments, content and finish_reason.
"""

from __future__ import annotations

import uuid
from typing import Any

from api.tool_parsers import ParsedCall
from api.tools import ToolPlan

Item = str | dict[str, Any]  # content text, or an OpenAI tool call


class ChoiceToolCalls:
    """Feeds one choice's output to its parser; numbers and names the calls it finds.

    With `parallel_tool_calls: false` only the first call is kept.
    """

    def __init__(self, plan: ToolPlan) -> None:
        assert plan.parser is not None, "tool calls need a parser"
        self.parser = plan.parser(plan.tool_names)
        self.at_most_one = plan.at_most_one
        self.named = plan.named
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[Item]:
        return self._items(self.parser.feed(text) if text else [])

    def finish(self) -> list[Item]:
        return self._items(self.parser.finish())

    def _items(self, events: list[str | ParsedCall]) -> list[Item]:
        items: list[Item] = []
        for event in events:
            if isinstance(event, str):
                items.append(event)
            elif not (self.at_most_one and self.calls):
                call = {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": event.name, "arguments": event.arguments},
                }
                self.calls.append(call)
                items.append(call)
        return items

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model ended after calling tools, except for a named
        tool_choice ("stop"); "length" stays "length"."""
        if engine_reason == "stop" and self.calls and not self.named:
            return "tool_calls"
        return engine_reason


def read_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]], Any]:
    """(content or None, calls, the ChoiceToolCalls) of a whole output."""
    reader = ChoiceToolCalls(plan)
    items = reader.feed(text) + reader.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return content or None, reader.calls, reader


def call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """A call as stream deltas: its head (id, type, name, empty arguments), then its
    arguments as one fragment."""
    head = {
        "index": index,
        "id": call["id"],
        "type": "function",
        "function": {"name": call["function"]["name"], "arguments": ""},
    }
    body = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
    return [head, body]
