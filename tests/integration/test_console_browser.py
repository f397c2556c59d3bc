"""The web console in headless Chromium against the real server: a streamed answer equals
the API's greedy answer, Stop aborts the request (its KV blocks come back), the dashboard
plots a non-zero throughput after a request. Each tab is saved as a screenshot."""

from __future__ import annotations

import re
import time

import httpx

from tests.browser import models_loaded, wait_until

SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTION = "What is the capital of France?"


def stats(server) -> dict:
    return httpx.get(server.base_url + "/v1/stats", timeout=10).json()


def aborted_requests(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    found = re.search(r'^tokenmill:request_success_total\{.*finished_reason="abort".*\} (\S+)$',
                      text, re.M)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def settle(server, timeout: float = 15.0) -> dict:
    """/v1/stats once nothing runs and no KV block is in use (or the last one)."""
    deadline = time.monotonic() + timeout
    while True:
        view = stats(server)
        idle = view["requests"]["running"] == 0 and view["kv_cache"]["blocks_in_use"] == 0
        if idle or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def open_chat(page, server, temperature: str, max_tokens: str) -> None:
    page.goto(server.base_url + "/")
    models_loaded(page)
    page.fill("#system-prompt", SYSTEM)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def test_the_streamed_answer_is_the_greedy_answer(server, console_page):
    page = console_page.page
    open_chat(page, server, "0", "40")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant[data-state=done]")
    answer.wait_for()
    model = page.locator("#model").input_value()
    body = {"model": model, "max_tokens": 40, "temperature": 0, "top_p": 1,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION}]}  # fmt: skip
    expected = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    content = expected["choices"][0]["message"]["content"]
    assert content and answer.get_attribute("data-raw") == content
    assert words(answer.locator(".content").text_content()) == words(content)
    assert answer.get_attribute("data-tokens") == str(expected["usage"]["completion_tokens"])
    assert float(answer.get_attribute("data-ttft-ms")) > 0
    assert float(answer.get_attribute("data-tokens-per-second")) > 0
    assert page.locator(".message.user .content").text_content() == QUESTION
    console_page.screenshot("chat")
    assert console_page.errors == []


def test_stop_aborts_the_request_server_side(server, console_page):
    page = console_page.page
    settle(server)
    aborted_before = aborted_requests(server)
    open_chat(page, server, "0", "1500")
    page.fill("#prompt", "Write a very long story about a lighthouse keeper and the sea.")
    page.click("#send")
    answer = page.locator(".message.assistant")
    wait_until(lambda: len(answer.get_attribute("data-raw") or "") > 20, what="20 streamed chars")
    running = stats(server)
    assert running["requests"]["running"] == 1 and running["kv_cache"]["blocks_in_use"] > 0
    page.click("#stop")
    stopped = page.locator(".message.assistant[data-state=stopped]")
    stopped.wait_for()
    view = settle(server)
    assert view["requests"]["running"] == 0 and view["kv_cache"]["blocks_in_use"] == 0
    assert aborted_requests(server) == aborted_before + 1
    assert "stopped" in stopped.locator(".meta").text_content()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    assert console_page.errors == []


# NOTE: the series colour of the first line (sparkline.js COLORS[0]), as drawn pixels
BLUE_PIXELS = """(canvas) => {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 150 && data[i] < 120) n += 1;
  return n;
}"""


def test_the_dashboard_plots_throughput_after_a_request(server, console_page):
    page = console_page.page
    page.goto(server.base_url + "/")
    page.click("#tab-dashboard")
    settle(server)
    # NOTE: earlier tests' tokens leave the rate window first, so what follows is this request's
    output = page.locator("[data-metric=output_tps]")
    wait_until(lambda: output.get_attribute("data-last") == "0", what="an idle throughput")
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}
    assert httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).status_code == 200
    wait_until(lambda: float(output.get_attribute("data-last")) > 0, what="a throughput")
    ttft = page.locator("[data-metric=ttft]")
    wait_until(lambda: float(ttft.get_attribute("data-last") or 0) > 0, what="a TTFT")
    assert float(output.get_attribute("data-peak")) > 0
    assert re.fullmatch(r"[\d.]+ tok/s", output.locator(".value").text_content())
    assert output.locator("canvas").evaluate(BLUE_PIXELS) > 0
    by_model = page.locator(f"[data-bars=by_model] .bar-row[data-name='{model}']")
    by_model.wait_for()
    assert float(by_model.get_attribute("data-seconds")) > 0
    assert float(page.locator("[data-bars=by_feature] .bar-row").first.get_attribute(
        "data-seconds")) > 0  # fmt: skip
    console_page.screenshot("dashboard")
    assert console_page.errors == []
