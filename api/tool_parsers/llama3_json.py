"""Llama 3.x JSON calls: the output is `{"name": ..., "parameters": {...}}`, several joined
by `;`, optionally after `<|python_tag|>`. An output that does not start with a call is
content; so is whatever follows the last call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from api.tool_parsers.base import Event, FunctionTool, ToolParser, tags_with_separator
from api.tool_parsers.json_scan import json_value_end

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"
WAIT, TEXT = "wait", "text"  # what a state step decided besides moving on


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    arguments_keys = ("parameters", "arguments")

    def __init__(self, tool_names) -> None:
        super().__init__(tool_names)
        self.state = "start"  # start -> calls <-> after_call; any of them -> text, for good
        self.steps = {"start": self._on_start, "calls": self._on_calls,
                      "after_call": self._on_after_call}  # fmt: skip

    def drain(self, out: list[Event], final: bool) -> None:
        while self.state != TEXT:
            head = self.buffer.lstrip()
            if not head:
                if not final:
                    return
                break
            decision = self.steps[self.state](head, final, out)
            if decision == WAIT:
                return
            if decision == TEXT:
                break
        self.state = TEXT
        self.sink.text(self.buffer, out)
        self.buffer = ""

    def _on_start(self, head: str, final: bool, out: list[Event]) -> str | None:
        if head.startswith(PYTHON_TAG):
            self.buffer, self.state = head[len(PYTHON_TAG) :], "calls"
            return None
        if PYTHON_TAG.startswith(head) and not final:
            return WAIT  # the tag in the making
        if not head.startswith("{"):
            return TEXT
        self.state = "calls"
        return None

    def _on_calls(self, head: str, final: bool, out: list[Event]) -> str | None:
        if not head.startswith("{"):
            return TEXT
        end = json_value_end(head)
        if end is None:
            return TEXT if final else WAIT
        call = self.parse_call(head[:end])
        if call is None:
            return TEXT
        self.buffer, self.state = head[end:], "after_call"
        self.sink.call(call, out)
        return None

    def _on_after_call(self, head: str, final: bool, out: list[Event]) -> str | None:
        if not head.startswith(SEPARATOR):
            return TEXT
        self.buffer, self.state = head[len(SEPARATOR) :], "calls"
        return None

    @classmethod
    def forced_calls_format(
        cls, tools: Sequence[FunctionTool], at_most_one: bool
    ) -> dict[str, Any]:
        tags = [
            (f'{{"name": {json.dumps(t.name)}, "parameters": ', t.arguments_schema, "}")
            for t in tools
        ]
        return tags_with_separator(tags, f"{SEPARATOR} ", at_most_one)
