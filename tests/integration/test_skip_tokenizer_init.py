"""`--skip-tokenizer-init` through a real server on the shipped tiny config: token-id prompts
in, `choices[].token_ids` out with empty text, no tokenizer loaded by any process, and a 400
naming the flag for everything that needs text."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ServerProcess

PROMPT = [11, 22, 33, 44, 55]
FLAG = "--skip-tokenizer-init"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokenmill-cache")
    srv = ServerProcess("--load-format", "dummy", "--hf-config-path", "tiny-llama", FLAG,
                        "--dtype", "float32", "--kv-cache-memory", "0.01",
                        "--max-model-len", "512", "--enforce-eager",
                        env={"TOKENMILL_CACHE_DIR": str(cache)})  # fmt: skip
    try:
        srv.wait_healthy()
        yield srv, cache
    finally:
        srv.stop()


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=60)


def _complete(srv, **extra) -> dict:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, **extra}  # fmt: skip
    r = _post(srv, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_token_ids_in_and_out(token_server):
    srv, cache = token_server
    out = _complete(srv)
    (choice,) = out["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 6 and all(0 <= t < 1024 for t in choice["token_ids"])
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 6
    assert _complete(srv)["choices"][0]["token_ids"] == choice["token_ids"]  # greedy
    models = httpx.get(srv.base_url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "tiny-llama"
    # NOTE: a GGUF tokenizer loaded by any process would have been converted into the cache
    assert not (cache / "tokenizers").exists()


def test_streamed_ids_match(token_server):
    srv, _ = token_server
    expected = _complete(srv)["choices"][0]["token_ids"]
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    ids, texts = [], []
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    ids += c["token_ids"]
                    texts.append(c["text"])
    assert ids == expected and set(texts) == {""}


def test_several_prompts_and_logprobs(token_server):
    srv, _ = token_server
    out = _complete(srv, prompt=[PROMPT, [7, 8, 9]], logprobs=1)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    first = out["choices"][0]
    assert first["logprobs"]["tokens"] == [f"token_id:{t}" for t in first["token_ids"]]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["a", [1, 2]], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "stop": ["x"]}, "stop"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "echo": True}, "echo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/tokenize", {"prompt": "hi"}, None),
        ("/detokenize", {"tokens": [1, 2]}, None),
    ],
)
def test_text_needs_the_tokenizer(token_server, path, body, param):
    srv, _ = token_server
    r = _post(srv, path, {"model": "tiny-llama", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert FLAG in error["message"] and error["param"] == param
