"""Structured-output fields of a request -> one grammar constraint (or none).

Accepted: OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `strict`),
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`), and the
older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. One constraint per
request; every bad specification is a 400 naming its field, including what xgrammar itself
refuses (`check_with_xgrammar`: does the schema, regex or grammar convert?).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from api.errors import bad_request
from api.json_schema_check import check_enforceable, check_schema, grammar_ready
from model_runner.grammar_cache import GrammarError, grammar_of
from model_runner.sampling_params import GrammarSpec

MAX_GRAMMAR_CHARS = 64 * 1024  # a regex or an EBNF grammar
MAX_CHOICES = 1024
SCHEMA_NAME_CHARS = 64
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's options: accepted where this server already does what they ask for.
STRUCTURED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


@dataclass(frozen=True)
class Constraint:
    """A request's grammar and the request field it came from (named in its errors)."""

    grammar: GrammarSpec
    param: str


def structured_constraint(req) -> Constraint | None:
    """The request's one structured-output constraint; 400 for a bad or a second one."""
    found = [
        c
        for c in (
            _response_format(req.response_format),
            _structured_outputs(req.structured_outputs),
            *_guided(req),
        )
        if c is not None
    ]
    if len(found) > 1:
        raise bad_request(
            f"Give one structured-output constraint per request, not both `{found[0].param}` "
            f"and `{found[1].param}`.",
            found[1].param,
        )
    return found[0] if found else None


def json_schema_grammar(
    schema: Any, param: str, strict: bool = True, openai_strict: bool = False
) -> GrammarSpec:
    """A checked JSON schema (object or JSON text) as a grammar spec.

    `strict`: objects get no properties the schema does not declare or explicitly allow
    (vLLM's default for guided_json). `openai_strict` (response_format's `strict: true`):
    as OpenAI, a schema whose objects allow undeclared properties is refused.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad_request(f"`{param}` is not valid JSON.", param) from None
    check_schema(schema, param)
    check_enforceable(schema, param, openai_strict)
    text = json.dumps(grammar_ready(schema), ensure_ascii=False)
    return GrammarSpec(kind="json_schema", spec=text, strict=strict)


def _response_format(fmt: dict[str, Any] | None) -> Constraint | None:
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(GrammarSpec(kind="json_object"), "response_format")
    if kind != "json_schema":
        raise bad_request(
            f"response_format type {kind!r} is not supported; use `text`, `json_object` or "
            "`json_schema`.",
            "response_format.type",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            "response_format `json_schema` needs a `json_schema` object.",
            "response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= SCHEMA_NAME_CHARS:
        raise bad_request(
            f"`response_format.json_schema.name` must be a string of 1 to {SCHEMA_NAME_CHARS} "
            "characters.",
            "response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(
            "`response_format.json_schema.strict` must be a boolean.",
            "response_format.json_schema.strict",
        )
    param = "response_format.json_schema.schema"
    schema = spec.get("schema", {})
    grammar = json_schema_grammar(schema, param, strict=bool(strict), openai_strict=bool(strict))
    return Constraint(grammar, param)


def _structured_outputs(fields: dict[str, Any] | None) -> Constraint | None:
    if fields is None:
        return None
    for key in fields:
        if key not in STRUCTURED_KEYS and key not in STRUCTURED_OPTIONS:
            raise bad_request(
                f"`structured_outputs.{key}` is not supported; give one of "
                f"{', '.join(STRUCTURED_KEYS)}.",
                f"structured_outputs.{key}",
            )
    given = [k for k in STRUCTURED_KEYS if fields.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request(
            f"`structured_outputs` needs exactly one of {', '.join(STRUCTURED_KEYS)}.",
            "structured_outputs",
        )
    key = given[0]
    param = f"structured_outputs.{key}"
    value = fields[key]
    if key == "json_object":
        if value is not True:
            raise bad_request(f"`{param}` must be true.", param)
        return Constraint(GrammarSpec(kind="json_object"), param)
    return _one(key, value, param)


GUIDED_KEYS = ("json", "regex", "choice", "grammar")  # vLLM's older guided_<key> fields


def _guided(req) -> list[Constraint | None]:
    if req.guided_whitespace_pattern is not None:
        raise bad_request(
            "`guided_whitespace_pattern` is not supported: JSON is generated compactly.",
            "guided_whitespace_pattern",
        )
    fields = {k: getattr(req, f"guided_{k}") for k in GUIDED_KEYS}
    return [_one(k, v, f"guided_{k}") for k, v in fields.items() if v is not None]


def _one(key: str, value: Any, param: str) -> Constraint:
    """json, regex, choice or grammar, as a checked Constraint."""
    if key == "json":
        if not isinstance(value, (dict, str)):
            raise bad_request(f"`{param}` must be a JSON schema (an object or its text).", param)
        return Constraint(json_schema_grammar(value, param), param)
    if key == "choice":
        return Constraint(GrammarSpec(kind="ebnf", spec=choice_grammar(value, param)), param)
    if not isinstance(value, str) or not value:
        raise bad_request(f"`{param}` must be a non-empty string.", param)
    if len(value) > MAX_GRAMMAR_CHARS:
        raise bad_request(
            f"`{param}` has {len(value)} characters; at most {MAX_GRAMMAR_CHARS}.", param
        )
    return Constraint(GrammarSpec(kind="regex" if key == "regex" else "ebnf", spec=value), param)


def choice_grammar(choices: Any, param: str) -> str:
    """An EBNF grammar admitting exactly one of the given strings."""
    if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
        raise bad_request(f"`{param}` must be a list of 1 to {MAX_CHOICES} strings.", param)
    if any(not isinstance(c, str) or not c for c in choices):
        raise bad_request(f"`{param}` must hold non-empty strings.", param)
    if sum(len(c) for c in choices) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"`{param}` holds more than {MAX_GRAMMAR_CHARS} characters.", param)
    return "root ::= " + " | ".join(ebnf_literal(c) for c in dict.fromkeys(choices))


_EBNF_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def ebnf_literal(text: str) -> str:
    """`text` as a quoted EBNF string literal (other control characters as \\xHH)."""
    out = []
    for ch in text:
        if ch in _EBNF_ESCAPES:
            out.append(_EBNF_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def check_with_xgrammar(constraints: list[Constraint]) -> None:
    """xgrammar must accept every spec, in order (a bad regex, EBNF or unsatisfiable schema
    is a 400 naming its field)."""
    for constraint in constraints:
        try:
            grammar_of(constraint.grammar)
        except GrammarError as e:
            raise bad_request(
                f"`{constraint.param}` cannot be compiled into a grammar: {e}",
                constraint.param,
                code="invalid_grammar",
            ) from None


def checked_constraint(req) -> Constraint | None:
    """The request's structured-output constraint, xgrammar's check passed."""
    constraint = structured_constraint(req)
    if constraint is not None:
        check_with_xgrammar([constraint])
    return constraint


SCHEMA_FIELDS = ("response_format", "structured_outputs", "tools",
                 *(f"guided_{k}" for k in GUIDED_KEYS))  # fmt: skip


async def off_the_loop(check, req, *args):
    """`check(req, *args)`, in a thread when the request has schema or grammar work
    (pure-Python JSON-schema validation of many tools takes tens of milliseconds;
    xgrammar's conversions release the GIL), so other requests' chunks keep streaming."""
    if any(getattr(req, name, None) is not None for name in SCHEMA_FIELDS):
        return await asyncio.to_thread(check, req, *args)
    return check(req, *args)
