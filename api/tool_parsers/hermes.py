"""Hermes calls (Hermes 2 Pro, Qwen 2.5):
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one or more.

Text outside the tags is content. A call whose closing tag never comes is still read at the
end of the output if its JSON is complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from api.tool_parsers.base import Event, FunctionTool, ToolParser, tags_with_separator
from api.tool_parsers.json_scan import partial_suffix

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    arguments_keys = ("arguments",)

    def __init__(self, tool_names) -> None:
        super().__init__(tool_names)
        self.in_call = False

    def drain(self, out: list[Event], final: bool) -> None:
        while True:
            if not self.in_call:
                start = self.buffer.find(START)
                if start < 0:
                    keep = 0 if final else partial_suffix(self.buffer, START)
                    cut = len(self.buffer) - keep
                    self.sink.text(self.buffer[:cut], out)
                    self.buffer = self.buffer[cut:]
                    return
                self.sink.text(self.buffer[:start], out)
                self.buffer = self.buffer[start + len(START) :]
                self.in_call = True
            end = self.buffer.find(END)
            if end < 0 and not final:
                return
            body = self.buffer if end < 0 else self.buffer[:end]
            markup = START + body + ("" if end < 0 else END)
            self.buffer = "" if end < 0 else self.buffer[end + len(END) :]
            self.in_call = False
            call = self.parse_call(body)
            if call is None:
                self.sink.text(markup, out)
            else:
                self.sink.call(call, out)

    @classmethod
    def forced_calls_format(
        cls, tools: Sequence[FunctionTool], at_most_one: bool
    ) -> dict[str, Any]:
        tags = [
            (f'{START}\n{{"name": {json.dumps(t.name)}, "arguments": ', t.arguments_schema,
             f"}}\n{END}")
            for t in tools
        ]  # fmt: skip
        return tags_with_separator(tags, "\n", at_most_one)
