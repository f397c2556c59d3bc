"""The API's OpenAPI 3.1 document, served at `GET /openapi.json`.

Request bodies are generated from the msgspec structs the routes decode with
(`msgspec.json.schema_components`), so the document cannot drift from what the server
accepts. OpenAPI 3.1 because msgspec emits JSON Schema 2020-12 (`{"type": "null"}` in an
`anyOf`), which 3.0 cannot express.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from api.responses_protocol import ResponsesRequest

REF_TEMPLATE = "#/components/schemas/{name}"
BEARER_SCHEME = "bearerAuth"


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object, as `api.errors.error_body` builds it."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


_JSON_OBJECT = {"type": "object"}
_CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {"object": {"const": "chat.completion"}, "choices": {"type": "array"}},
}
_TEXT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {"object": {"const": "text_completion"}, "choices": {"type": "array"}},
}
# NOTE: before OpenAPI 3.2 (`itemSchema`) an event stream's `schema` describes one event;
# the data is a JSON chunk or the final `[DONE]`.
_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "status", "output", "usage"],
    "properties": {"object": {"const": "response"}, "output": {"type": "array"}},
}
_RESPONSE_DELETED = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {"deleted": {"const": True}},
}
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_SSE = {"text/event-stream": {"schema": _SSE_EVENT}}


@dataclass(frozen=True)
class Route:
    """One operation: its body struct (if any) and its 200 response's content."""

    method: str
    path: str
    summary: str
    ok_content: dict[str, Any] | None  # None: an empty 200
    body: type[msgspec.Struct] | None = None
    path_params: tuple[str, ...] = ()


def _json(schema: dict) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


ROUTES = (
    Route("post", "/v1/chat/completions", "Create a chat completion (SSE when `stream`)",
          {**_json(_CHAT_COMPLETION), **_SSE}, ChatCompletionRequest),
    Route("post", "/v1/completions", "Create a text completion (SSE when `stream`)",
          {**_json(_TEXT_COMPLETION), **_SSE}, CompletionRequest),
    Route("post", "/v1/responses", "Create a response (Responses API; semantic SSE events "
          "when `stream`)", {**_json(_RESPONSE), **_SSE}, ResponsesRequest),
    Route("get", "/v1/responses/{response_id}", "Retrieve a stored response",
          _json(_RESPONSE), path_params=("response_id",)),
    Route("delete", "/v1/responses/{response_id}", "Delete a stored response",
          _json(_RESPONSE_DELETED), path_params=("response_id",)),
    Route("get", "/v1/models", "List the served models", _json(_JSON_OBJECT)),
    Route("get", "/v1/models/{model}", "Describe one model", _json(_JSON_OBJECT),
          path_params=("model",)),
    Route("post", "/tokenize", "Tokenize a prompt or a chat", _json(_JSON_OBJECT),
          TokenizeRequest),
    Route("post", "/detokenize", "Turn token ids into text", _json(_JSON_OBJECT),
          DetokenizeRequest),
    Route("get", "/health", "200 while the engine is healthy, else 503", None),
    Route("get", "/version", "The server's version", _json(_JSON_OBJECT)),
    Route("get", "/v1/stats", "The engine's numbers for the console's dashboard (JSON)",
          _json(_JSON_OBJECT)),
    Route("get", "/metrics", "Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
    Route("post", "/reset_prefix_cache", "Drop the prefix cache", _json(_JSON_OBJECT)),
    Route("get", "/openapi.json", "This document", _json(_JSON_OBJECT)),
)  # fmt: skip


def _operation(route: Route, secured: bool) -> dict[str, Any]:
    error = {
        "description": "OpenAI's error body",
        "content": _json({"$ref": _ref("ErrorResponse")}),
    }
    ok: dict[str, Any] = {"description": "OK"}
    if route.ok_content is not None:
        ok["content"] = route.ok_content
    op: dict[str, Any] = {
        "operationId": route.method + route.path.replace("/", "_").replace(".", "_"),
        "summary": route.summary,
        "responses": {"200": ok, "4XX": error, "5XX": error},
    }
    if route.body is not None:
        schema = {"$ref": _ref(route.body.__name__)}
        op["requestBody"] = {"required": True, "content": _json(schema)}
    if route.path_params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.path_params
        ]
    if secured:
        op["security"] = [{BEARER_SCHEME: []}]
    return op


def _ref(name: str) -> str:
    return REF_TEMPLATE.format(name=name)


def openapi_document(version: str, secured: Callable[[str], bool] | None = None) -> dict:
    """The document; `secured(path)` says which paths need the API key (None: no key set)."""
    structs = [r.body for r in ROUTES if r.body is not None] + [ErrorResponse]
    _, components = msgspec.json.schema_components(structs, ref_template=REF_TEMPLATE)
    paths: dict[str, dict] = {}
    for route in ROUTES:
        is_secured = secured is not None and secured(route.path)
        paths.setdefault(route.path, {})[route.method] = _operation(route, is_secured)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tokenmill", "version": version,
                 "description": "OpenAI-compatible LLM inference server"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {BEARER_SCHEME: {"type": "http", "scheme": "bearer"}},
        },
    }  # fmt: skip
