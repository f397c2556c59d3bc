"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request -> a ToolPlan.

vLLM's rules: `auto` (and `tools` without `tool_choice`) needs `--enable-auto-tool-choice`
and `--tool-call-parser`; `required` and a named function work without them, because a
grammar forces the call (in the format of the configured parser, hermes by default) and
that parser reads it back; `none` keeps the tools in the prompt unless
`--exclude-tools-when-tool-choice-none`. Every bad field is a 400 naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from api.errors import bad_request
from api.json_schema_check import check_enforceable, check_schema, grammar_ready
from api.structured_outputs import Constraint, check_with_xgrammar, structured_constraint
from api.tool_parsers import FunctionTool, ToolParser, get_tool_parser
from model_runner.sampling_params import GrammarSpec

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
DEFAULT_FORCED_PARSER = "hermes"


@dataclass(frozen=True)
class ToolConfig:
    """The server's tool-calling flags."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools.

    `prompt_tools` go to the chat template; `parser` (None: no parsing, plain content) reads
    calls back from each choice; `forced` is the grammar of `required` / a named function,
    and `schema_checks` its tools' parameters, checked one by one to name a bad one.
    """

    prompt_tools: list[dict[str, Any]] | None = None
    parser: type[ToolParser] | None = None
    tool_names: frozenset[str] = field(default_factory=frozenset)
    forced: Constraint | None = None
    named: bool = False  # OpenAI answers finish_reason "stop" for a named function
    at_most_one: bool = False  # parallel_tool_calls: false
    schema_checks: tuple[Constraint, ...] = ()

    @property
    def grammar_checks(self) -> list[Constraint]:
        """What xgrammar must accept before the request goes on: each tool, then the whole."""
        return [*self.schema_checks, self.forced] if self.forced is not None else []


NO_TOOLS = ToolPlan()


def plan_tools(req, config: ToolConfig) -> ToolPlan:
    """The request's ToolPlan; a 400 naming the field for anything wrong."""
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise bad_request("`tool_choice` is set but `tools` is not.", "tool_choice")
        return NO_TOOLS
    tools = check_tools(req.tools)
    named = _named_choice(choice, tools)
    at_most_one = req.parallel_tool_calls is False
    if choice == "none":
        prompt = None if config.exclude_tools_when_tool_choice_none else req.tools
        return ToolPlan(prompt_tools=prompt)
    if named is None and choice in (None, "auto"):
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and '
                "--tool-call-parser to be set.",
                "tool_choice",
            )
        parser = get_tool_parser(config.tool_call_parser)
        return ToolPlan(req.tools, parser, _names(tools), at_most_one=at_most_one)
    return _forced_plan(req, config, tools, named, at_most_one)


def _forced_plan(req, config: ToolConfig, tools: list[FunctionTool], named: int | None,
                 at_most_one: bool) -> ToolPlan:  # fmt: skip
    """`required` (named None) or a named function: the grammar of the calls, in the
    format of the configured parser (hermes when none is), and its tools' schema checks."""
    parser = get_tool_parser(config.tool_call_parser or DEFAULT_FORCED_PARSER)
    indices = list(range(len(tools))) if named is None else [named]
    checks = []
    for i in indices:
        if tools[i].parameters is not None:
            check_enforceable(req.tools[i]["function"]["parameters"], _params(i), strict=False)
            schema = json.dumps(tools[i].parameters, ensure_ascii=False)
            checks.append(Constraint(GrammarSpec(kind="json_schema", spec=schema), _params(i)))
    fmt = parser.forced_calls_format([tools[i] for i in indices], at_most_one or named is not None)
    tag = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)
    forced = Constraint(GrammarSpec(kind="structural_tag", spec=tag), "tools")
    return ToolPlan(
        req.tools, parser, _names(tools), forced, named is not None, at_most_one, tuple(checks)
    )


def _names(tools: list[FunctionTool]) -> frozenset[str]:
    return frozenset(t.name for t in tools)


def check_tools(tools: Any) -> list[FunctionTool]:
    """Validated function tools (caps, names, JSON-schema parameters of type object)."""
    if not isinstance(tools, list) or not tools:
        raise bad_request("`tools` must be a non-empty list.", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"`tools` holds at most {MAX_TOOLS} tools.", "tools")
    out: list[FunctionTool] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request("Only tools of type `function` are supported.", f"tools[{i}].type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request("A tool needs a `function` object.", f"tools[{i}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad_request(
                "A function name must be 1 to 64 letters, digits, underscores or dashes.",
                f"tools[{i}].function.name",
            )
        if name in seen:
            raise bad_request(f"Two tools are named `{name}`.", f"tools[{i}].function.name")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise bad_request(
                "A function description must be a string.", f"tools[{i}].function.description"
            )
        out.append(FunctionTool(name, _parameters(fn.get("parameters"), i)))
    return out


def _parameters(params: Any, i: int) -> dict[str, Any] | None:
    """The schema a forced call's arguments follow (None: the tool takes none)."""
    if params is None:
        return None
    check_schema(params, _params(i))
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise bad_request("A function's parameters must be a schema of type `object`.", _params(i))
    return grammar_ready(params)


def _params(i: int) -> str:
    return f"tools[{i}].function.parameters"


def _named_choice(choice: Any, tools: list[FunctionTool]) -> int | None:
    """The index of the tool a named tool_choice forces; None for the string choices."""
    if choice in (None, "none", "auto", "required"):
        return None
    if isinstance(choice, str):
        raise bad_request(
            f"Unknown tool_choice {choice!r}; use none, auto, required or a named function.",
            "tool_choice",
        )
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            'A named tool_choice is {"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    for i, tool in enumerate(tools):
        if tool.name == name:
            return i
    raise bad_request(f"tool_choice names `{name}`, which is not in `tools`.", "tool_choice")


def chat_constraints(req, config: ToolConfig) -> tuple[ToolPlan, Constraint | None]:
    """The request's ToolPlan and its one grammar: structured output or the forced tool
    call, not both; every spec checked, xgrammar's conversion included."""
    plan = plan_tools(req, config)
    structure = structured_constraint(req)
    if structure is not None and plan.forced is not None:
        raise bad_request(
            f"`{structure.param}` cannot be combined with a `tool_choice` that forces a call.",
            structure.param,
        )
    check_with_xgrammar([structure] if structure else plan.grammar_checks)
    return plan, structure or plan.forced
