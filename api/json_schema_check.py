"""JSON schemas in requests: caps, validity, and the keywords a grammar can enforce exactly.

A schema that becomes a grammar (response_format, guided_json, the parameters of a forced
tool call) may only use keywords that xgrammar enforces exactly; anything else is a 400
naming the keyword, never a silently looser grammar. The list was checked keyword by keyword
against xgrammar 0.2.9 (tests/api/test_schema_enforcement.py): e.g. `uniqueItems`,
`contains`, `not`, `if`, `patternProperties`, `dependentRequired` and multi-schema `allOf`
are ignored by it, `oneOf` degrades to `anyOf`, number `multipleOf` is ignored, and
`minLength`/`maxLength` are dropped beside `pattern` or `format`.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import msgspec

from api.errors import ApiError, bad_request

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

ANNOTATIONS = frozenset(
    {"title", "description", "examples", "default", "deprecated", "readOnly", "writeOnly",
     "$comment", "$schema", "$id"}
)  # fmt: skip
ENFORCED = ANNOTATIONS | {
    "type", "enum", "const", "$ref", "$defs", "definitions", "anyOf", "allOf",
    "properties", "required", "additionalProperties", "propertyNames", "minProperties",
    "maxProperties", "unevaluatedProperties",
    "items", "prefixItems", "minItems", "maxItems", "unevaluatedItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
}  # fmt: skip
FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
)
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_VALUES = (
    "additionalProperties", "propertyNames", "unevaluatedProperties", "items", "unevaluatedItems"
)  # fmt: skip


def check_schema(schema: Any, param: str) -> None:
    """Size and depth caps, then a valid JSON Schema (its own `$schema`, else 2020-12)."""
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"`{param}` must be a JSON schema object.", param)
    size = len(msgspec.json.encode(schema))
    if size > MAX_SCHEMA_BYTES:
        raise bad_request(
            f"`{param}` is {size} bytes; a schema may have at most {MAX_SCHEMA_BYTES}.", param
        )
    if (depth := nesting_depth(schema)) > MAX_SCHEMA_DEPTH:
        raise bad_request(
            f"`{param}` nests {depth} levels deep; a schema may nest at most {MAX_SCHEMA_DEPTH}.",
            param,
        )
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        at = f" (at `{where}`)" if where else ""
        raise bad_request(f"`{param}` is not a valid JSON schema: {e.message}{at}", param) from None


def nesting_depth(value: Any) -> int:
    """How deeply dicts and lists nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_enforceable(schema: Any, param: str, strict: bool) -> None:
    """Every keyword of `schema` must be one the grammar enforces exactly (400 otherwise).

    With `strict` (OpenAI's), objects admit no undeclared properties: an
    `additionalProperties` other than false, or a required property that is not declared,
    is refused.
    """
    for node, path in _subschemas(schema):
        problem = _problem(node, strict)
        if problem is not None:
            keyword, why = problem
            where = f" at `{path}`" if path else ""
            raise ApiError(
                400,
                f"JSON schema keyword `{keyword}`{where} in `{param}` is not supported: {why}",
                param=param,
                code="unsupported_schema_keyword",
            )


def _subschemas(schema: Any):
    """(subschema, JSON-pointer-ish path) for every schema position, root first."""
    stack = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, path
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((sub, f"{path}/{key}/{name}") for name, sub in node[key].items())
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((sub, f"{path}/{key}/{i}") for i, sub in enumerate(node[key]))
        for key in _SCHEMA_VALUES:
            if key in node:
                stack.append((node[key], f"{path}/{key}"))


def _problem(node: dict, strict: bool) -> tuple[str, str] | None:
    """(keyword, why) for the first thing in this one schema object the grammar cannot do."""
    for keyword in node:
        if keyword not in ENFORCED:
            return keyword, "structured output cannot enforce it exactly."
    if len(node.get("allOf", ())) > 1:
        return "allOf", "only a single-schema `allOf` can be enforced."
    if isinstance(node.get("items"), list):
        return "items", "an array of item schemas is not supported; use `prefixItems`."
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return "$ref", "only references within the schema (`#/...`) are supported."
    if "format" in node and node["format"] not in FORMATS:
        return "format", f"format {node['format']!r} is not one of {', '.join(sorted(FORMATS))}."
    lengths = "minLength" in node or "maxLength" in node
    if lengths and ("pattern" in node or "format" in node):
        other = "pattern" if "pattern" in node else "format"
        return "maxLength" if "maxLength" in node else "minLength", (
            f"a length bound cannot be enforced together with `{other}`."
        )
    if "pattern" in node and "format" in node:
        return "format", "`format` cannot be enforced together with `pattern`."
    return _strict_object_problem(node) if strict else None


def _strict_object_problem(node: dict) -> tuple[str, str] | None:
    if node.get("additionalProperties", False) is not False:
        return "additionalProperties", "strict mode admits no undeclared properties."
    if node.get("type") != "object" and "properties" not in node:
        return None
    declared = node.get("properties") or {}
    for name in node.get("required") or ():
        if name not in declared:
            return "required", f"property `{name}` is required but strict mode cannot add it."
    return None


def grammar_ready(schema: Any) -> Any:
    """A copy in which every unbounded `integer` is bounded to int64.

    NOTE: tighter, never looser: a small model can no longer run an integer on for as many
    digits as max_tokens allows, and JSON parsers hold the result.
    """
    schema = copy.deepcopy(schema)
    for node, _ in _subschemas(schema):
        if node.get("type") == "integer":
            if "minimum" not in node and "exclusiveMinimum" not in node:
                node["minimum"] = INT64_MIN
            if "maximum" not in node and "exclusiveMaximum" not in node:
                node["maximum"] = INT64_MAX
    return schema
