"""The error table of tool and structured-output requests: (id, path, body, status, param,
a fragment the message must contain). Shared by the fake-engine test and the real server."""

from __future__ import annotations

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SCHEMA_PARAM = "response_format.json_schema.schema"


def chat(**fields) -> dict:
    return {"messages": MSG, "max_tokens": 8, **fields}


def completion(**fields) -> dict:
    return {"prompt": "Hello", "max_tokens": 8, **fields}


def tool(name: str = "get_weather", parameters: dict | None = None, **function) -> dict:
    fn = {"name": name, **function}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


def schema_format(schema, strict: bool | None = None) -> dict:
    spec = {"name": "answer", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def history(arguments, tool_call_id: str = "call_1") -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": tool_call_id, "content": "21 C"},
    ]  # fmt: skip


OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
REQUIRED = {"tool_choice": "required"}

CASES = [
    # tools and tool_choice
    ("auto-without-flags", CHAT, chat(tools=[WEATHER]), 400, "tool_choice",
     "--enable-auto-tool-choice"),
    ("explicit-auto-without-flags", CHAT, chat(tools=[WEATHER], tool_choice="auto"), 400,
     "tool_choice", "--tool-call-parser"),
    ("tool-choice-without-tools", CHAT, chat(tool_choice="required"), 400, "tool_choice",
     "tools"),
    ("named-tool-not-offered", CHAT, chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_time"}}), 400, "tool_choice", "get_time"),
    ("named-tool-malformed", CHAT, chat(tools=[WEATHER], tool_choice={"type": "function"}),
     400, "tool_choice", "name"),
    ("tool-choice-unknown", CHAT, chat(tools=[WEATHER], tool_choice="sometimes"), 400,
     "tool_choice", "sometimes"),
    ("tools-empty", CHAT, chat(tools=[], **REQUIRED), 400, "tools", "non-empty"),
    ("tools-too-many", CHAT, chat(tools=[tool(f"t{i}") for i in range(129)], **REQUIRED), 400,
     "tools", "128"),
    ("tool-not-a-function", CHAT, chat(tools=[{"type": "code_interpreter"}], **REQUIRED), 400,
     "tools[0].type", "function"),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}], **REQUIRED), 400,
     "tools[0].function", "function"),
    ("tool-bad-name", CHAT, chat(tools=[tool("get weather")], **REQUIRED), 400,
     "tools[0].function.name", "letters"),
    ("tool-duplicate-name", CHAT, chat(tools=[WEATHER, WEATHER], **REQUIRED), 400,
     "tools[1].function.name", "get_weather"),
    ("tool-parameters-invalid-schema", CHAT, chat(tools=[tool(parameters={"type": "objekt"})]),
     400, "tools[0].function.parameters", "not a valid JSON schema"),
    ("tool-parameters-not-object", CHAT, chat(tools=[tool(parameters={"type": "string"})],
     **REQUIRED), 400, "tools[0].function.parameters", "object"),
    ("tool-parameters-too-deep", CHAT, chat(tools=[tool(parameters=nested(40))], **REQUIRED),
     400, "tools[0].function.parameters", "nest"),
    ("tool-parameters-unique-items", CHAT, chat(tools=[tool(parameters={
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})],
        **REQUIRED), 400, "tools[0].function.parameters", "uniqueItems"),
    ("tool-parameters-unsatisfiable", CHAT, chat(tools=[tool(parameters={
        "type": "object", "properties": {"s": {"type": "string", "minLength": 5,
                                               "maxLength": 2}}})], **REQUIRED), 400,
     "tools[0].function.parameters", "minLength"),
    ("history-arguments-not-json", CHAT, chat(messages=history("{not json")), 400,
     "messages[1].tool_calls[0].function.arguments", "JSON object"),
    ("history-tool-answers-unknown-call", CHAT, chat(messages=history({"city": "P"}, "call_9")),
     400, "messages[2].tool_call_id", "tool_call_id"),
    ("structure-and-forced-tool", CHAT, chat(tools=[WEATHER], tool_choice="required",
     response_format={"type": "json_object"}), 400, "response_format", "tool_choice"),
    # response_format
    ("response-format-unknown-type", CHAT, chat(response_format={"type": "yaml"}), 400,
     "response_format.type", "yaml"),
    ("json-schema-missing", CHAT, chat(response_format={"type": "json_schema"}), 400,
     "response_format.json_schema", "json_schema"),
    ("json-schema-without-name", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"schema": OBJ}}), 400,
     "response_format.json_schema.name", "name"),
    ("json-schema-invalid", CHAT, chat(response_format=schema_format({"type": 5})), 400,
     SCHEMA_PARAM, "not a valid JSON schema"),
    ("json-schema-not-an-object", CHAT, chat(response_format=schema_format([1])), 400,
     SCHEMA_PARAM, "JSON schema object"),
    ("json-schema-unique-items", CHAT, chat(response_format=schema_format(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True})), 400,
     SCHEMA_PARAM, "uniqueItems"),
    ("json-schema-multiple-of", CHAT, chat(response_format=schema_format(
        {"type": "number", "multipleOf": 0.5})), 400, SCHEMA_PARAM, "multipleOf"),
    ("json-schema-pattern-with-max-length", CHAT, chat(response_format=schema_format(
        {"type": "string", "pattern": "^a+$", "maxLength": 3})), 400, SCHEMA_PARAM,
     "maxLength"),
    ("json-schema-one-of", CHAT, chat(response_format=schema_format(
        {"oneOf": [{"type": "integer"}, {"type": "number"}]})), 400, SCHEMA_PARAM, "oneOf"),
    ("json-schema-not", CHAT, chat(response_format=schema_format({"not": {"type": "null"}})),
     400, SCHEMA_PARAM, "not"),
    ("json-schema-unknown-format", CHAT, chat(response_format=schema_format(
        {"type": "string", "format": "credit-card"})), 400, SCHEMA_PARAM, "credit-card"),
    ("json-schema-remote-ref", CHAT, chat(response_format=schema_format(
        {"$ref": "https://example.com/s.json"})), 400, SCHEMA_PARAM, "$ref"),
    ("json-schema-strict-additional", CHAT, chat(response_format=schema_format(
        {**OBJ, "additionalProperties": True}, strict=True)), 400, SCHEMA_PARAM,
     "additionalProperties"),
    ("json-schema-unsatisfiable", CHAT, chat(response_format=schema_format(
        {"type": "string", "minLength": 5, "maxLength": 2})), 400, SCHEMA_PARAM, "minLength"),
    ("json-schema-missing-ref", CHAT, chat(response_format=schema_format(
        {"$ref": "#/$defs/missing"})), 400, SCHEMA_PARAM, "missing"),
    ("json-schema-too-big", CHAT, chat(response_format=schema_format({"type": "object",
        "properties": {f"p{i:05d}": {"type": "string"} for i in range(3000)}})), 400,
     SCHEMA_PARAM, "bytes"),
    # structured_outputs and guided_*
    ("guided-regex-invalid", CHAT, chat(guided_regex="(ab"), 400, "guided_regex", "parenthesis"),
    ("guided-regex-empty", COMPLETIONS, completion(guided_regex=""), 400, "guided_regex",
     "non-empty"),
    ("guided-grammar-invalid", CHAT, chat(guided_grammar='root ::= "a" |'), 400,
     "guided_grammar", "EBNF"),
    ("guided-choice-empty", CHAT, chat(guided_choice=[]), 400, "guided_choice", "list"),
    ("guided-choice-not-strings", CHAT, chat(guided_choice=[1]), 400, "guided_choice[0]", "str"),
    ("guided-json-not-json", COMPLETIONS, completion(guided_json="{not json"), 400,
     "guided_json", "not valid JSON"),
    ("guided-whitespace-pattern", CHAT, chat(guided_json=OBJ, guided_whitespace_pattern=" *"),
     400, "guided_whitespace_pattern", "compactly"),
    ("structured-outputs-two-kinds", CHAT, chat(structured_outputs={
        "regex": "a+", "choice": ["a"]}), 400, "structured_outputs", "exactly one"),
    ("structured-outputs-unknown-key", CHAT, chat(structured_outputs={"regexp": "a"}), 400,
     "structured_outputs.regexp", "regexp"),
    ("structured-outputs-structural-tag", COMPLETIONS, completion(structured_outputs={
        "structural_tag": "{}"}), 400, "structured_outputs.structural_tag", "not supported"),
    ("structured-outputs-bad-grammar", COMPLETIONS, completion(structured_outputs={
        "grammar": "start: x"}), 400, "structured_outputs.grammar", "EBNF"),
    ("two-constraints", CHAT, chat(response_format={"type": "json_object"}, guided_regex="a"),
     400, "guided_regex", "one structured-output constraint"),
    ("completions-unique-items", COMPLETIONS, completion(response_format=schema_format(
        {"type": "array", "uniqueItems": True})), 400, SCHEMA_PARAM, "uniqueItems"),
]  # fmt: skip
