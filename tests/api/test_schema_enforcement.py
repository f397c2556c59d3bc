"""Every JSON-schema keyword the server accepts is enforced exactly by the grammar it becomes.

Each case is (schema, instances the grammar must admit, instances it must refuse), run
through the server's own path (checks, tightening, xgrammar's conversion). JSON is compact:
`", "` and `": "` separators (a `const` or `enum` value is written without spaces).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from xgrammar.testing import _is_grammar_accept_string

from api.errors import ApiError
from api.json_schema_check import ANNOTATIONS, ENFORCED, FORMATS
from api.structured_outputs import json_schema_grammar
from api.tool_parsers import FunctionTool, get_tool_parser
from model_runner.grammar_cache import grammar_of
from model_runner.sampling_params import GrammarSpec

OBJ_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CASES = [
    ({"type": "integer"}, ["-5", "9223372036854775807"], ["1.5", '"1"', "92233720368547758070"]),
    ({"type": ["string", "null"]}, ['"x"', "null"], ["1"]),
    ({"enum": ["x", 1, None]}, ['"x"', "1", "null"], ["2", '"y"']),
    ({"const": {"a": [1]}}, ['{"a":[1]}'], ['{"a":[2]}']),  # NOTE: constants stay as sent
    ({"type": "integer", "minimum": 2, "maximum": 5}, ["2", "5"], ["1", "6"]),
    ({"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 1.5}, ["1", "1.25"],
     ["0.5", "1.5"]),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"日本語"'],
     ['"a"', '"abcd"', '"a\tb"']),
    ({"type": "string", "pattern": "^[a-z]+$"}, ['"abc"'], ['"aB"', '""']),
    ({"type": "string", "format": "date"}, ['"2024-02-29"'], ['"2024-13-01"', '"x"']),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'],
     ['"123e4567"']),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     ["[1]", "[1, 2]"], ["[]", "[1, 2, 3]", '["a"]']),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False}, ['["a"]'],
     ['["a", 1]', "[1]"]),
    ({"type": "array", "items": {"type": "integer"}, "unevaluatedItems": False}, ["[1, 2]"],
     ['["a"]']),
    (OBJ_A, ['{"a": 1}'], ["{}", '{"a": 1, "b": 2}', '{"a": "x"}']),
    ({**OBJ_A, "additionalProperties": {"type": "string"}}, ['{"a": 1, "b": "x"}'],
     ['{"a": 1, "b": 2}']),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 1, "maxProperties": 1},
     ['{"a": 1}'], ["{}"]),
    ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
      "additionalProperties": {"type": "integer"}}, ['{"ab": 1}'], ['{"A": 1}']),
    ({**OBJ_A, "unevaluatedProperties": False}, ['{"a": 1}'], ['{"a": 1, "b": 1}']),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, ["1", '"ab"'],
     ["null", '"abc"']),
    ({"allOf": [OBJ_A]}, ['{"a": 1}'], ["{}"]),
    ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}, ["1"], ['"x"']),
    ({"definitions": {"n": {"type": "boolean"}}, "type": "array",
      "items": {"$ref": "#/definitions/n"}}, ["[true]"], ["[1]"]),
    ({"type": "object", "title": "T", "description": "d", "examples": [{}], "default": {},
      "deprecated": False, "readOnly": False, "writeOnly": False, "$comment": "c",
      "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x",
      "properties": {}}, ["{}"], ['{"a": 1}']),
]  # fmt: skip


def grammar(schema: dict):
    return grammar_of(json_schema_grammar(schema, "response_format"))


@pytest.mark.parametrize(("schema", "good", "bad"), CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_the_grammar_admits_exactly_what_the_schema_validates(schema, good, bad):
    compiled = grammar(schema)
    for text in good:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
        assert _is_grammar_accept_string(compiled, text), text
    for text in bad:
        assert not _is_grammar_accept_string(compiled, text), text


def test_every_accepted_keyword_has_a_case():
    used: set[str] = set()
    stack = [case[0] for case in CASES]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            used.update(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert ENFORCED - used == set()
    assert ANNOTATIONS <= ENFORCED


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_accepted_format_compiles(fmt):
    grammar({"type": "string", "format": fmt})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "uniqueItems": True},
        {"type": "array", "contains": {"type": "integer"}},
        {"type": "number", "multipleOf": 2},
        {"type": "integer", "multipleOf": 2},
        {"not": {"type": "integer"}},
        {"if": {"type": "integer"}, "then": {"minimum": 3}},
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        {"allOf": [{"type": "integer"}, {"minimum": 3}]},
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
        {"type": "object", "dependentRequired": {"a": ["b"]}},
        {"type": "string", "pattern": "^a+$", "maxLength": 3},
        {"type": "string", "format": "date", "minLength": 3},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "array",
            "items": [{"type": "integer"}],
        },
        {"type": "string", "format": "binary"},
        {"type": "object", "nullable": True},
    ],
    ids=lambda s: json.dumps(s),
)
def test_what_xgrammar_would_loosen_is_refused(schema):
    with pytest.raises(ApiError) as info:
        json_schema_grammar(schema, "response_format")
    assert info.value.status == 400 and info.value.code == "unsupported_schema_keyword"


def test_forced_tool_arguments_keep_length_bounded_strings_json():
    tool = FunctionTool("note", {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 8}}, "required": ["text"]})  # fmt: skip
    fmt = get_tool_parser("hermes").forced_calls_format([tool], at_most_one=True)
    spec = GrammarSpec(kind="structural_tag", spec=json.dumps({"type": "structural_tag",
                                                               "format": fmt}))  # fmt: skip
    compiled = grammar_of(spec)
    call = '<tool_call>\n{"name": "note", "arguments": {"text": "%s"}}\n</tool_call>'
    assert _is_grammar_accept_string(compiled, call % "a b")
    assert not _is_grammar_accept_string(compiled, call % "a\tb")
    assert not _is_grammar_accept_string(compiled, call % "123456789")
