"""The web console's routes (fake engine): the page and its files with a strict CSP, public
even with --api-key; /v1/stats behind the key; --disable-ui leaves only the API."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from api.cli import build_parser, server_config
from api.console import CONTENT_SECURITY_POLICY, static_files
from api.server import ServerConfig, create_app

STATIC = Path(__file__).parents[2] / "api" / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)


def test_the_policy_is_the_issued_one():
    assert CONTENT_SECURITY_POLICY == CSP


@pytest.mark.parametrize("path", ["/", "/ui", "/ui/"])
async def test_the_page_is_served_with_its_policy(client, path):
    resp = await client.get(path)
    assert resp.status_code == 200
    assert resp.content_type == "text/html; charset=utf-8"
    assert resp.headers["Content-Security-Policy"] == CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "<title>tokenmill console</title>" in await resp.get_data(as_text=True)


async def test_every_file_the_page_names_is_served_with_its_type(client):
    html = (STATIC / "index.html").read_text()
    named = re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)
    js = "\n".join(p.read_text() for p in STATIC.glob("*.js"))
    named += [f"/ui/{m}" for m in re.findall(r'from "\./([\w.]+)"', js)]
    assert {"/ui/console.js", "/ui/console.css", "/ui/chat.js", "/ui/markdown.js"} <= set(named)
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for path in set(named):
        resp = await client.get(path)
        assert resp.status_code == 200, path
        assert resp.content_type == types[Path(path).suffix], path
        assert resp.headers["Content-Security-Policy"] == CSP
        assert await resp.get_data() == (STATIC / Path(path).name).read_bytes()


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/..%2Fserver.py", "/ui/index.htm"])
async def test_unknown_files_are_404s(client, path):
    resp = await client.get(path)
    assert resp.status_code == 404
    assert (await resp.get_json())["error"]["type"] == "NotFoundError"


def test_the_files_need_no_inline_code_and_build_no_html():
    """What the CSP would block anyway, kept out of the source: inline scripts and styles,
    handler attributes; and no HTML is built from strings (answers become text nodes)."""
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"<style|\sstyle=|\son\w+=", html)
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "setAttribute(\"style\""):  # fmt: skip
            assert sink not in source, f"{script.name} uses {sink}"


def test_the_shipped_files_are_package_data():
    pyproject = msgspec.toml.decode((STATIC.parents[1] / "pyproject.toml").read_bytes())
    globs = pyproject["tool"]["setuptools"]["package-data"]["api"]
    for path in STATIC.iterdir():
        assert any(path.match(glob) for glob in globs), f"{path.name} is not package data"
    assert set(static_files()) == {p.name for p in STATIC.iterdir()}


async def test_with_an_api_key_the_page_is_public_and_stats_are_not(engine):
    client = create_app(engine, ServerConfig(api_key="s3cret")).test_client()
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/ui/console.js")).status_code == 200
    assert (await client.get("/v1/stats")).status_code == 401
    resp = await client.get("/v1/stats", headers={"Authorization": "Bearer s3cret"})
    assert resp.status_code == 200
    assert (await resp.get_json())["object"] == "engine.stats"


async def test_disable_ui_leaves_only_the_api(engine):
    client = create_app(engine, ServerConfig(enable_ui=False)).test_client()
    for path in ("/", "/ui", "/ui/console.js"):
        assert (await client.get(path)).status_code == 404, path
    assert (await client.get("/v1/stats")).status_code == 200
    assert (await client.get("/v1/models")).status_code == 200


def test_the_disable_ui_flag():
    parse = build_parser().parse_args
    assert server_config(parse(["serve"])).enable_ui is True
    assert server_config(parse(["serve", "--disable-ui"])).enable_ui is False
