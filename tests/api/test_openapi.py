"""The OpenAPI document: valid OpenAPI 3.1, every route in it, bodies generated from structs."""

from __future__ import annotations

import re

import jsonschema
import msgspec
import pytest
import schemathesis

import api.openapi
from api.errors import error_body
from api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from api.openapi import Route, openapi_document
from api.server import ServerConfig, create_app, needs_api_key

BODY_STRUCTS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def _schema_of(doc: dict, ref: str) -> dict:
    name = ref.removeprefix("#/components/schemas/")
    return doc["components"]["schemas"][name]


def _quart_routes(app) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every API route the app serves (HEAD/OPTIONS are implicit;
    the web console's page and files are not API)."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("console."):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        out |= {(m.lower(), path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


async def test_served_document_is_valid_openapi(client):
    resp = await client.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.content_type == "application/json"
    doc = await resp.get_json()
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # the official OpenAPI 3.1 meta-schema
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_invalid_document_is_refused_by_the_validator():
    doc = openapi_document("1.0")
    doc["paths"]["/health"]["get"]["responses"] = {"200": {"content": {}}}  # no description
    with pytest.raises(Exception, match="description"):
        schemathesis.openapi.from_dict(doc).validate()


def test_every_route_is_documented(app):
    doc = openapi_document("1.0")
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _quart_routes(app)
    assert ("get", "/v1/models/{model}") in documented


def test_request_bodies_are_the_structs():
    doc = openapi_document("1.0")
    for path, struct in BODY_STRUCTS.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        schema = _schema_of(doc, body["content"]["application/json"]["schema"]["$ref"])
        fields = msgspec.structs.fields(struct)
        assert set(schema["properties"]) == {f.encode_name for f in fields}
        required = {f.encode_name for f in fields if f.required}
        assert set(schema.get("required", [])) == required
    assert _schema_of(doc, "#/components/schemas/DetokenizeRequest")["required"] == ["tokens"]


def test_a_field_added_to_a_struct_appears(monkeypatch):
    class DetokenizeRequest(api.openapi.DetokenizeRequest, kw_only=True):
        brand_new_field: int = 7

    routes = tuple(
        Route(r.method, r.path, r.summary, r.ok_content, DetokenizeRequest)
        if r.body is api.openapi.DetokenizeRequest
        else r
        for r in api.openapi.ROUTES
    )
    monkeypatch.setattr(api.openapi, "ROUTES", routes)
    schema = _schema_of(openapi_document("1.0"), "#/components/schemas/DetokenizeRequest")
    assert schema["properties"]["brand_new_field"] == {"type": "integer", "default": 7}


def test_errors_are_described_in_openai_shape():
    doc = openapi_document("1.0")
    for ops in doc["paths"].values():
        for op in ops.values():
            for status in ("4XX", "5XX"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                # the ref's target, rooted where its own refs resolve
                schema = {**_schema_of(doc, ref), "components": doc["components"]}
                jsonschema.validate(error_body("bad", 400, param="n"), schema)
                jsonschema.validate(error_body("bad", 401, code="invalid_api_key"), schema)
                with pytest.raises(jsonschema.ValidationError):
                    jsonschema.validate({"error": {"message": "no type"}}, schema)


def test_streaming_routes_document_sse():
    doc = openapi_document("1.0")
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}


async def test_bearer_security_follows_the_api_key(engine):
    public = await (await create_app(engine).test_client().get("/openapi.json")).get_json()
    assert all("security" not in op for ops in public["paths"].values() for op in ops.values())
    app = create_app(engine, ServerConfig(api_key="sk-1"))
    resp = await app.test_client().get("/openapi.json")  # public even with a key
    assert resp.status_code == 200
    doc = await resp.get_json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert ("security" in op) == needs_api_key(path), path
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
