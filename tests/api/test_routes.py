"""Models, health, version, metrics, tokenize/detokenize, prefix-cache reset, the API key."""

from __future__ import annotations

import re

import msgspec
import pytest

from actors.protocol import SchedulerStats
from api.server import ServerConfig, create_app
from model_runner.grammar_cache import GrammarCacheStats
from tests.api.fake_engine import EMPTY_STATS

KEY = "sk-test-123"


@pytest.fixture
def secured(engine):
    return create_app(engine, ServerConfig(api_key=KEY)).test_client()


async def test_models(client):
    resp = await client.get("/v1/models")
    body = await resp.get_json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == ("fake-model", "model", 512)
    one = await (await client.get("/v1/models/fake-model")).get_json()
    assert one == card
    assert (await client.get("/v1/models/other")).status_code == 404


async def test_health_follows_engine(client, engine):
    resp = await client.get("/health")
    assert resp.status_code == 200
    engine.healthy = (False, "actor scheduler stopped")
    resp = await client.get("/health")
    assert resp.status_code == 503
    error = (await resp.get_json())["error"]
    assert "actor scheduler stopped" in error["message"]
    assert error["type"] == "ServiceUnavailableError"


async def test_version(client):
    body = await (await client.get("/version")).get_json()
    assert re.match(r"\d+\.\d+", body["version"])


def metric(text: str, name: str) -> float:
    match = re.search(rf"^tokenmill:{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    assert match, f"metric {name} missing"
    return float(match.group(1))


async def test_metrics_from_engine_stats(client, engine):
    engine.stats = SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                                  num_blocks_in_use=10, prefix_cache_queries=160,
                                  prefix_cache_hits=64, num_preemptions=1)  # fmt: skip
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    text = await resp.get_data(as_text=True)
    assert metric(text, "num_requests_running") == 3
    assert metric(text, "num_requests_waiting") == 2
    assert metric(text, "kv_cache_usage_perc") == 0.25
    assert metric(text, "prefix_cache_queries_total") == 160
    assert metric(text, "prefix_cache_hits_total") == 64
    assert metric(text, "num_preemptions_total") == 1
    assert 'model_name="fake-model"' in text
    assert metric(text, "grammar_compiles_total") == 0


async def test_grammar_metrics_from_engine_stats(client, engine):
    grammar = GrammarCacheStats(
        compiles=4, compile_seconds=1.5, cache_hits=9, cache_bytes=4096, cache_entries=3
    )
    engine.stats = msgspec.structs.replace(EMPTY_STATS, grammar=grammar)
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert metric(text, "grammar_compiles_total") == 4
    assert metric(text, "grammar_compile_seconds_total") == 1.5
    assert metric(text, "grammar_cache_hits_total") == 9
    assert metric(text, "grammar_cache_bytes") == 4096


async def test_metrics_count_requests(client, engine):
    engine.stats = None  # before the engine's first report: zeros, not an error
    await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "n": 2})
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert metric(text, "num_requests_running") == 0
    assert metric(text, "generation_tokens_total") == 8
    assert metric(text, "prompt_tokens_total") == 1
    assert re.search(r'^tokenmill:request_success_total\{finished_reason="length",'
                     r'model_name="fake-model"\} 2\.0$', text, re.M)  # fmt: skip
    assert metric(text, "time_to_first_token_seconds_count") == 1
    assert metric(text, "e2e_request_latency_seconds_count") == 1
    assert metric(text, "inter_token_latency_seconds_count") == 6


async def test_metrics_registries_are_per_app(engine):
    one, two = create_app(engine).test_client(), create_app(engine).test_client()
    await one.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    text_one = await (await one.get("/metrics")).get_data(as_text=True)
    text_two = await (await two.get("/metrics")).get_data(as_text=True)
    assert metric(text_one, "generation_tokens_total") == 2
    assert not re.search(r"^tokenmill:generation_tokens_total", text_two, re.M)


async def test_tokenize_detokenize_round_trip(client, tokenizer):
    text = "Héllo, wörld! 12345 🚀"
    body = await (await client.post("/tokenize", json={"prompt": text})).get_json()
    assert body["tokens"] == tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert body["token_strs"] is None
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).get_json()
    assert back == {"prompt": text}


async def test_tokenize_chat_and_token_strs(client, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    req = {"messages": messages, "return_token_strs": True}
    body = await (await client.post("/tokenize", json=req)).get_json()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert body["token_strs"][0] == "<|im_start|>"


async def test_reset_prefix_cache(client, engine):
    resp = await client.post("/reset_prefix_cache")
    assert resp.status_code == 200 and (await resp.get_json()) == {"success": True}
    assert engine.resets == 1


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"])
async def test_api_key_refuses(secured, engine, header):
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/reset_prefix_cache")):  # fmt: skip
        resp = await secured.open(path, method=method, headers=headers,
                                  json={"prompt": "Hi", "max_tokens": 1})  # fmt: skip
        assert resp.status_code == 401
        error = (await resp.get_json())["error"]
        assert error["type"] == "AuthenticationError" and error["code"] == "invalid_api_key"
    assert engine.calls == [] and engine.resets == 0


async def test_api_key_accepts(secured, engine):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert (await secured.get("/v1/models", headers=headers)).status_code == 200
    resp = await secured.post("/v1/completions", headers=headers,
                              json={"prompt": "Hi", "max_tokens": 1})  # fmt: skip
    assert resp.status_code == 200
    assert (await secured.post("/reset_prefix_cache", headers=headers)).status_code == 200
    # Operational endpoints stay open, as in vLLM (probes, scrapers).
    for path in ("/health", "/metrics", "/version"):
        assert (await secured.get(path)).status_code == 200


async def test_a_client_request_id_is_echoed_when_well_formed(client):
    body = {"prompt": "Hi", "max_tokens": 2}
    resp = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "abc-1"})
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == "abc-1"
    refused = await client.post("/v1/completions", json={}, headers={"X-Request-Id": "abc-2"})
    assert refused.status_code == 400 and refused.headers["X-Request-Id"] == "abc-2"
    for bad in ("x" * 129, "two words"):
        resp = await client.post("/v1/completions", json=body, headers={"X-Request-Id": bad})
        assert resp.status_code == 200 and "X-Request-Id" not in resp.headers
    assert "X-Request-Id" not in (await client.post("/v1/completions", json=body)).headers
