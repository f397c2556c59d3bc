"""An exception inside a model step (injected at the 20th forward) fails exactly the
requests of that step, streamed (an error event in OpenAI's shape, then [DONE]) and not (a
500 with the error body), frees their KV blocks, and the next requests are served normally:
greedy output still identical to HF transformers."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from model_runner.fault_injection import FAULT_ENV
from tests.conftest import GREEDY_NEW_TOKENS, GREEDY_PROMPTS, ServerProcess
from tests.ops.invariants import assert_nothing_lost
from tests.ops.test_drain import Stream

FAULT_AT = 20  # both requests below need 64 forwards each, so both are in this one


@pytest.fixture(scope="module")
def faulty_server():
    with ServerProcess("--dtype", "float32", "--max-model-len", "1024",
                       "--kv-cache-memory", "0.25", "--enforce-eager",
                       env={FAULT_ENV: str(FAULT_AT)}) as srv:  # fmt: skip
        yield srv


def test_a_step_fault_fails_its_requests_and_the_engine_serves_on(
    faulty_server, hf_tokenizer, hf_greedy
):
    base = faulty_server.base_url
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    stream = Stream(base, model, 64)
    plain: dict = {}

    def post_plain():
        resp = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 64, "ignore_eos": True})  # fmt: skip
        plain.update(status=resp.status_code, body=resp.json())

    plain_thread = threading.Thread(target=post_plain)
    stream.start()
    plain_thread.start()
    stream.join(120)
    plain_thread.join(120)

    assert stream.status == 200 and stream.events[-1] == "[DONE]"
    error = json.loads(stream.events[-2])["error"]
    assert error["message"] == "The engine failed while generating this request."
    chunks = [json.loads(e) for e in stream.events[:-2]]
    assert chunks and not any(c["finish_reason"] for ch in chunks for c in ch["choices"])
    assert plain["status"] == 500
    assert plain["body"]["error"]["message"] == error["message"]
    assert set(plain["body"]["error"]) == {"message", "type", "param", "code"}

    assert_nothing_lost(base)
    for prompt in GREEDY_PROMPTS[:3]:
        resp = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": GREEDY_NEW_TOKENS,
            "temperature": 0})  # fmt: skip
        assert resp.status_code == 200, resp.text
        expected = hf_tokenizer.decode(hf_greedy[prompt], skip_special_tokens=True)
        assert resp.json()["choices"][0]["text"] == expected, prompt
    log = open(faulty_server.log.name).read()
    assert f"fault injected at forward {FAULT_AT}" in log
