"""What a tool parser is: it finds calls in one choice's output as the output streams in.

A parser turns text into events: content strings and `ParsedCall`s, in order. It is fed the
text in pieces (`feed`) and told when it ends (`finish`); any split of a text gives the same
events, joined, as the whole text at once, so streamed and non-streamed responses agree. A
call is reported once it is complete and valid (a known tool, arguments that are a JSON
object); markup that does not make one is content. Model output is data: it is parsed as
JSON, never evaluated.

Each parser also says how to force calls in its format (`forced_calls_format`): an xgrammar
structural tag that admits only calls to the given tools, with schema-valid arguments.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

NO_PARAMETERS = {"type": "object", "properties": {}}
# NOTE: at most one whitespace character between JSON tokens of forced arguments: a small
# model cannot stall in a run of blank lines.
MAX_ARGUMENT_WHITESPACE = 1


@dataclass(frozen=True)
class FunctionTool:
    """A validated `tools[i].function`: its name and parameters' schema (grammar-ready)."""

    name: str
    parameters: dict[str, Any] | None = None

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else NO_PARAMETERS


@dataclass(frozen=True)
class ParsedCall:
    """A complete call: `arguments` is a JSON object as text (`"{}"` when none were given)."""

    name: str
    arguments: str


Event = str | ParsedCall


class ContentSink:
    """Collects content around calls: whitespace next to a call is dropped at the start and
    the end of the content; between two pieces of text, the run before the call stays.

    NOTE: a whitespace run waits until what follows it is known, so the result does not
    depend on where the text was split.
    """

    def __init__(self) -> None:
        self.pending_space = ""  # trailing whitespace of the text so far
        self.gap = ""  # the whitespace before the last call(s), kept if text follows
        self.after_call = False
        self.emitted = False

    def text(self, text: str, out: list[Event]) -> None:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            text, self.gap, self.after_call = self.gap + text, "", False
        combined = self.pending_space + text
        body = combined.rstrip()
        self.pending_space = combined[len(body) :]
        if body:
            out.append(body)
            self.emitted = True

    def call(self, call: ParsedCall, out: list[Event]) -> None:
        if not self.after_call:
            self.gap = self.pending_space if self.emitted else ""
        self.pending_space = ""
        self.after_call = True
        out.append(call)

    def finish(self, out: list[Event]) -> None:
        if self.pending_space and not self.after_call:
            out.append(self.pending_space)
        self.pending_space = self.gap = ""


class ToolParser(ABC):
    """One choice's parser; see the module docstring. Subclasses set `name`."""

    name: ClassVar[str]
    arguments_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names = frozenset(tool_names)
        self.sink = ContentSink()
        self.buffer = ""

    def feed(self, text: str) -> list[Event]:
        """Events decided by the text so far."""
        self.buffer += text
        out: list[Event] = []
        self.drain(out, final=False)
        return out

    def finish(self) -> list[Event]:
        """The remaining events once the output has ended."""
        out: list[Event] = []
        self.drain(out, final=True)
        self.sink.finish(out)
        return out

    @abstractmethod
    def drain(self, out: list[Event], final: bool) -> None:
        """Move what `self.buffer` decides into `out` (all of it when `final`)."""

    @classmethod
    @abstractmethod
    def forced_calls_format(
        cls, tools: Sequence[FunctionTool], at_most_one: bool
    ) -> dict[str, Any]:
        """An xgrammar structural-tag format admitting one or more calls (one with
        `at_most_one`) to `tools`, in this parser's format, and nothing else."""

    def parse_call(self, text: str) -> ParsedCall | None:
        """A call from `{"name": ..., "arguments": {...}}` text, or None if it is not one."""
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.tool_names:
            return None
        arguments = next((obj[k] for k in self.arguments_keys if k in obj), {})
        if isinstance(arguments, str):  # some models encode the arguments twice
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def tags_with_separator(
    tags: Sequence[tuple[str, dict[str, Any], str]], separator: str, at_most_one: bool
) -> dict[str, Any]:
    """A structural-tag format of (begin, arguments schema, end) tags, one or more of them."""
    return {
        "type": "tags_with_separator",
        "tags": [
            {
                "type": "tag",
                "begin": begin,
                "content": {
                    "type": "json_schema",
                    "json_schema": schema,
                    "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE,
                },
                "end": end,
            }
            for begin, schema, end in tags
        ],
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": at_most_one,
    }
