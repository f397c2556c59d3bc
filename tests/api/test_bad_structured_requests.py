"""Bad tool and structured-output requests: a 400 naming the field, nothing reaches the
engine, and the server keeps answering (fake engine; the real server runs the same table in
tests/integration/test_structured_outputs.py)."""

from __future__ import annotations

import pytest

from tests.api.structured_cases import CASES, COMPLETIONS

STRING_CODES = {"unsupported_schema_keyword", "invalid_grammar"}


@pytest.mark.parametrize(("path", "body", "status", "param", "fragment"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
async def test_bad_specification(client, engine, path, body, status, param, fragment):
    for stream in (False, True):
        resp = await client.post(path, json={**body, "stream": stream})
        assert resp.status_code == status
        error = (await resp.get_json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["type"]) == (param, "BadRequestError")
        assert error["code"] == status or error["code"] in STRING_CODES
        assert fragment in error["message"], error["message"]
    assert engine.calls == [], "a bad request reached the engine"
    resp = await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200
