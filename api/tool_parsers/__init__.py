"""Tool-call parsers by name (vLLM's names): `hermes`, `llama3_json`, and plugins.

`--tool-parser-plugin FILE` imports a Python file at start; it registers its parsers with
`@register_tool_parser("name")` on a `ToolParser` subclass (see `api.tool_parsers.base`).
NOTE: the registry is filled at import and at start-up, and only read while serving.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from api.tool_parsers.base import FunctionTool, ParsedCall, ToolParser
from api.tool_parsers.hermes import HermesToolParser
from api.tool_parsers.llama3_json import Llama3JsonToolParser

__all__ = [
    "FunctionTool",
    "ParsedCall",
    "ToolParser",
    "get_tool_parser",
    "load_tool_parser_plugin",
    "register_tool_parser",
    "tool_parser_names",
]

_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def register_tool_parser(name: str):
    """Class decorator: make a ToolParser subclass available as `--tool-call-parser name`."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
            raise TypeError(f"{cls!r} is not a ToolParser subclass")
        cls.name = name
        _PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return _PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; one of {', '.join(tool_parser_names())}"
        ) from None


def tool_parser_names() -> list[str]:
    return sorted(_PARSERS)


def load_tool_parser_plugin(path: str) -> None:
    """Import the plugin file (it registers its parsers); a bad file is a ValueError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"tool parser plugin {path!r} is not a file")
    module_name = f"tokenmill_tool_parser_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"tool parser plugin {path!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
