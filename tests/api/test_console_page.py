"""The web console in headless Chromium against a fake engine on a real socket: markup in an
answer renders as text under the CSP, and the API key flow (asked for, kept in
sessionStorage only, sent as a Bearer header)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from api.server import ServerConfig, create_app
from tests.browser import app_on_socket, free_port, models_loaded, wait_until

HOSTILE_ANSWER = (
    'Look: <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
    "**bold** and `<b>code</b>`\n\n```python\nprint('<i>hi</i>')\n```\n1. first\n2. second"
)


@pytest.fixture
def served(engine):
    """Serves the fake engine under a config: a context manager yielding its base URL."""

    def serve(config: ServerConfig | None = None):
        config = dataclasses.replace(config or ServerConfig(), port=free_port())
        return app_on_socket(create_app(engine, config), config)

    return serve


def send(page, text: str) -> None:
    models_loaded(page)
    page.fill("#prompt", text)
    page.click("#send")


def test_markup_in_an_answer_renders_as_text(served, engine, console_page):
    engine.set_output(HOSTILE_ANSWER)
    page = console_page.page
    with served() as url:
        resp = page.goto(url + "/")
        assert resp.headers["content-security-policy"].startswith("default-src 'self'")
        send(page, "Say something dangerous")
        answer = page.locator(".message.assistant[data-state=done]")
        answer.wait_for()
        content = answer.locator(".content")
        assert answer.get_attribute("data-raw") == engine.tokenizer.decode(engine.output_ids)
        assert page.evaluate("window.pwned") is None
        assert content.locator("script, img, i, b").count() == 0
        text = content.text_content()
        assert "<script>window.pwned = 1</script>" in text
        assert '<img src=x onerror="window.pwned = 2">' in text
        assert content.locator("strong").text_content() == "bold"
        assert content.locator("p code").text_content() == "<b>code</b>"
        assert content.locator("pre code").text_content() == "print('<i>hi</i>')"
        assert content.locator("figcaption").text_content() == "python"
        assert content.locator("li").all_text_contents() == ["1. first", "2. second"]
        tokens = len(engine.output_ids)
        assert answer.get_attribute("data-tokens") == str(tokens)
        assert re.search(
            rf"^{tokens} tokens · prompt \d+ · TTFT \d+ ms", answer.locator(".meta").text_content()
        )
    assert console_page.errors == []


def test_the_page_asks_for_the_key_and_keeps_it_in_the_session(served, engine, console_page):
    page = console_page.page
    with served(ServerConfig(api_key="s3cret")) as url:
        resp = page.goto(url + "/ui")
        assert resp.status == 200  # the page itself is public
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert page.locator("#model option").count() == 0
        page.fill("#key-input", "s3cret")
        page.click("#key-save")
        models_loaded(page)
        assert page.locator("#model").input_value() == "fake-model"
        assert page.evaluate("sessionStorage.getItem('tokenmill.apiKey')") == "s3cret"
        assert page.evaluate("localStorage.length") == 0
        assert page.evaluate("document.cookie") == ""
        with page.expect_request("**/v1/chat/completions") as sent:
            send(page, "Hello")
        assert sent.value.headers["authorization"] == "Bearer s3cret"
        page.locator(".message.assistant[data-state=done]").wait_for()
        assert len(engine.calls) == 1
        page.reload()  # the same tab keeps the key: no dialog, models load at once
        models_loaded(page)
        assert not dialog.is_visible()
    assert console_page.errors == []


def test_a_refused_key_is_asked_for_again(served, console_page):
    page = console_page.page
    with served(ServerConfig(api_key="s3cret")) as url:
        page.goto(url + "/")
        page.fill("#key-input", "wrong")
        page.click("#key-save")
        page.locator("#key-error").wait_for(state="visible")
        assert page.locator("#key-dialog").is_visible()
        assert page.locator("#server-status").text_content() == "Invalid or missing API key."
    # NOTE: the refused /v1/models call is the one error the browser logs here
    assert [e for e in console_page.errors if "401" not in e] == []


def test_regenerate_asks_again_and_copy_copies_the_raw_answer(served, engine, console_page):
    engine.set_output("First **answer**")
    page = console_page.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    with served() as url:
        page.goto(url + "/")
        send(page, "Hello")
        page.locator(".message.assistant[data-state=done]").wait_for()
        engine.set_output("Second answer")
        page.click("#regenerate")
        answer = page.locator(".message.assistant[data-state=done]")
        wait_until(lambda: answer.get_attribute("data-raw") == "Second answer", what="new answer")
        assert page.locator(".message.assistant").count() == 1
        assert len(engine.calls) == 2 and engine.calls[0]["prompt"] == engine.calls[1]["prompt"]
        engine.set_output("Third")
        send(page, "Once more")  # the conversation so far goes with it
        page.locator(".message.assistant[data-state=done] >> nth=1").wait_for()
        assert "Second answer" in engine.calls[2]["prompt"]
        assert "First" not in engine.calls[2]["prompt"]
        page.locator(".message.assistant .copy").first.click()
        assert page.evaluate("navigator.clipboard.readText()") == "Second answer"
    assert console_page.errors == []
