"""Tool parsers on hand-written model outputs, whole and split at every character boundary."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from api.tool_parsers import (
    FunctionTool,
    ParsedCall,
    get_tool_parser,
    load_tool_parser_plugin,
    tool_parser_names,
)
from api.tool_parsers.json_scan import json_value_end, partial_suffix

TOOLS = {"get_weather", "search", "ping"}


def parse(name: str, pieces: list[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content or None, calls) of an output fed in `pieces`."""
    parser = get_tool_parser(name)(TOOLS)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, [e for e in events if isinstance(e, ParsedCall)]


def splits(text: str):
    """The text whole, in two at every boundary, and one character at a time."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


def hermes(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


HERMES_CASES = [
    ("one call", hermes("get_weather", '{"city": "Paris"}'),
     None, [("get_weather", {"city": "Paris"})]),
    ("several calls", hermes("get_weather", '{"city": "Oslo"}') + "\n" + hermes("ping", "{}"),
     None, [("get_weather", {"city": "Oslo"}), ("ping", {})]),
    ("text before and after", "Let me check.\n" + hermes("search", '{"q": "x"}') + "\nDone.",
     "Let me check.\nDone.", [("search", {"q": "x"})]),
    ("text between calls keeps one gap",
     "A:  " + hermes("ping", "{}") + "\n\n" + hermes("ping", "{}") + " \nB",
     "A:  B", [("ping", {}), ("ping", {})]),
    ("broken JSON stays content", '<tool_call>\n{"name": "ping", "arguments": {\n</tool_call>',
     '<tool_call>\n{"name": "ping", "arguments": {\n</tool_call>', []),
    ("unknown tool stays content", hermes("rm_rf", "{}"), hermes("rm_rf", "{}"), []),
    ("unicode arguments", hermes("search", '{"q": "日本の天気 ☀️", "lang": "ja"}'),
     None, [("search", {"q": "日本の天気 ☀️", "lang": "ja"})]),
    ("arguments as a JSON string", hermes("search", '"{\\"q\\": \\"a\\"}"'),
     None, [("search", {"q": "a"})]),
    ("no arguments", '<tool_call>\n{"name": "ping"}\n</tool_call>', None, [("ping", {})]),
    ("unclosed call at the end", '<tool_call>\n{"name": "ping", "arguments": {"n": 1}}',
     None, [("ping", {"n": 1})]),
    ("truncated call", '<tool_call>\n{"name": "ping", "argu',
     '<tool_call>\n{"name": "ping", "argu', []),
    ("a lone marker prefix is content", "a <tool_ca b", "a <tool_ca b", []),
    ("plain text keeps its whitespace", "  Hello,\n\nworld.  \n", "  Hello,\n\nworld.  \n", []),
    ("arguments that are not an object", hermes("ping", "[1, 2]"), hermes("ping", "[1, 2]"), []),
    ("braces inside strings", hermes("search", '{"q": "} ] { \\" </tool_call"}'),
     None, [("search", {"q": '} ] { " </tool_call'})]),
]  # fmt: skip


def llama(name: str, parameters: str) -> str:
    return f'{{"name": "{name}", "parameters": {parameters}}}'


LLAMA_CASES = [
    ("one call", llama("get_weather", '{"city": "Rome"}'), None,
     [("get_weather", {"city": "Rome"})]),
    ("python tag and two calls",
     "<|python_tag|>" + llama("ping", "{}") + "; " + llama("search", '{"q": "ü"}'),
     None, [("ping", {}), ("search", {"q": "ü"})]),
    ("text after the calls", llama("ping", "{}") + " \n That is all.", "That is all.",
     [("ping", {})]),
    ("prose is content", "The answer is {42}.", "The answer is {42}.", []),
    ("broken JSON is content", '{"name": "ping", "parameters": {"a": }}',
     '{"name": "ping", "parameters": {"a": }}', []),
    ("unknown tool is content", llama("format_disk", "{}"), llama("format_disk", "{}"), []),
    ("a second broken call becomes content",
     llama("ping", "{}") + '; {"name": "search", "parameters": {',
     '{"name": "search", "parameters": {', [("ping", {})]),
    ("arguments key accepted too", '{"name": "ping", "arguments": {"x": [1, {"y": null}]}}',
     None, [("ping", {"x": [1, {"y": None}]})]),
    ("leading whitespace before text is kept", "  hi <", "  hi <", []),
]  # fmt: skip


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_both_parsers_are_registered(parser):
    assert parser in tool_parser_names()


PARSER_CASES = [("hermes", *c) for c in HERMES_CASES] + [("llama3_json", *c) for c in LLAMA_CASES]


@pytest.mark.parametrize("case", PARSER_CASES, ids=[f"{c[0]}: {c[1]}" for c in PARSER_CASES])
def test_every_split_gives_the_whole_texts_result(case):
    parser, _, text, content, calls = case
    expected = (content, [ParsedCall(n, json.dumps(a, ensure_ascii=False)) for n, a in calls])
    for pieces in splits(text):
        assert parse(parser, pieces) == expected, pieces


def test_deeply_nested_output_is_content_not_a_crash():
    text = hermes("ping", "[" * 5000 + "]" * 5000)
    assert parse("hermes", [text]) == (text, [])


def test_json_scan_finds_ends_and_marker_prefixes():
    assert json_value_end('{"a": "}"} tail') == len('{"a": "}"}')
    assert json_value_end('[1, {"b": [2]}]x') == len('[1, {"b": [2]}]')
    assert json_value_end('{"a": [1}') == len('{"a": [1}')  # mismatch: decided, and broken
    assert json_value_end('{"a": "\\"}') is None
    assert json_value_end("x{}") is None
    assert partial_suffix("abc <tool", "<tool_call>") == 5
    assert partial_suffix("<tool_call", "<tool_call>") == 10
    assert partial_suffix("abc", "<tool_call>") == 0


SCHEMAS = [
    FunctionTool("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}),
    FunctionTool("ping"),
]  # fmt: skip


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_the_forced_format_admits_what_the_parser_reads_back(name):
    parser_cls = get_tool_parser(name)
    tag = {"type": "structural_tag", "format": parser_cls.forced_calls_format(SCHEMAS, False)}
    grammar = xgr.Grammar.from_structural_tag(json.dumps(tag))
    if name == "hermes":
        good = hermes("get_weather", '{"city": "Nice", "unit": "c"}') + "\n" + hermes("ping", "{}")
        bad = [hermes("get_weather", '{"unit": "c"}'), hermes("nope", "{}"), "hello"]
    else:
        good = llama("get_weather", '{"city": "Nice", "unit": "c"}') + "; " + llama("ping", "{}")
        bad = [llama("get_weather", '{"city": 3}'), llama("ping", '{"x": 1}'), ""]
    assert _is_grammar_accept_string(grammar, good)
    for text in bad:
        assert not _is_grammar_accept_string(grammar, text), text
    _, calls = parse(name, [good])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Nice", "unit": "c"}),
        ("ping", {}),
    ]


def test_at_most_one_call_when_parallel_calls_are_off():
    parser_cls = get_tool_parser("hermes")
    tag = {"type": "structural_tag", "format": parser_cls.forced_calls_format(SCHEMAS, True)}
    grammar = xgr.Grammar.from_structural_tag(json.dumps(tag))
    one = hermes("ping", "{}")
    assert _is_grammar_accept_string(grammar, one)
    assert not _is_grammar_accept_string(grammar, one + "\n" + one)


def test_a_plugin_file_registers_a_parser(tmp_path):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from api.tool_parsers import register_tool_parser\n"
        "from api.tool_parsers.hermes import HermesToolParser\n"
        "@register_tool_parser('my_hermes')\n"
        "class MyParser(HermesToolParser):\n"
        "    pass\n"
    )
    load_tool_parser_plugin(str(plugin))
    assert get_tool_parser("my_hermes").name == "my_hermes"
    with pytest.raises(ValueError, match="not a file"):
        load_tool_parser_plugin(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")
