"""The tool-calling and structured-output flags of `tokenmill serve` (vLLM's names)."""

from __future__ import annotations

import argparse


def add_tool_args(p: argparse.ArgumentParser) -> None:
    """Tool calling and structured output (vLLM's flag names)."""
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs '
        "--tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help="how tool calls are read from the output: hermes, llama3_json, or a plugin's",
    )
    p.add_argument(
        "--tool-parser-plugin",
        default=None,
        metavar="FILE",
        help="a Python file that registers more tool parsers (@register_tool_parser)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template that replaces the model's own",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a request's own chat_template (rendered sandboxed, 1 s and 4 MiB at most)",
    )
    p.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action="store_true",
        help='leave the tools out of the prompt when tool_choice is "none"',
    )
    p.add_argument(
        "--structured-outputs-timeout",
        type=float,
        default=10.0,
        help="seconds a grammar may take to compile before its request fails with a 400",
    )
