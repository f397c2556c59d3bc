"""Multi-LoRA: three peft adapters on the default model, greedy output token for token equal
to HF transformers with the same adapter applied, alone and mixed in one batch, offline and
over HTTP; prefix caching keyed by adapter; runtime load/unload; bad adapters refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from api import LLM, LoRARequest, SamplingParams
from tests.conftest import ServerProcess, free_port
from tests.integration.lora_adapters import (
    NEW_TOKENS,
    PROMPTS,
    hf_greedy_with,
    make_adapters,
)

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, hf_model) -> dict[str, str]:
    return make_adapters(hf_model, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def hf_outputs(hf_model, hf_tokenizer, adapters) -> dict[str | None, list[list[int]]]:
    out = {name: hf_greedy_with(hf_model, hf_tokenizer, path) for name, path in adapters.items()}
    out[None] = hf_greedy_with(hf_model, hf_tokenizer, None)
    return out


@pytest.fixture(scope="module")
def llm(adapters):
    engine = LLM(dtype="float32", enable_lora=True, lora_modules=tuple(adapters.items()),
                 max_loras=4, use_tqdm=False)  # fmt: skip
    yield engine
    engine.shutdown()


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_each_adapter_changes_the_output_and_matches_hf(llm, adapters, hf_outputs):
    for name, path in adapters.items():
        differ = sum(a != b for a, b in zip(hf_outputs[name], hf_outputs[None], strict=True))
        assert differ >= len(PROMPTS) // 2, f"{name} barely changes the output"
        got = tokens(llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest(name, 1, path)))
        assert got == hf_outputs[name], name
    assert tokens(llm.generate(PROMPTS, GREEDY)) == hf_outputs[None]


def mixed_batch(adapters) -> tuple[list[str], list[LoRARequest | None], list[str | None]]:
    names = [None, *adapters]
    prompts, requests, which = [], [], []
    for i in range(24):
        name = names[i % len(names)]
        prompts.append(PROMPTS[(i // len(names)) % len(PROMPTS)])
        requests.append(None if name is None else LoRARequest(name, 1, adapters[name]))
        which.append(name)
    return prompts, requests, which


def expected(hf_outputs, prompts, which) -> list[list[int]]:
    return [hf_outputs[name][PROMPTS.index(p)] for p, name in zip(prompts, which, strict=True)]


def test_a_mixed_batch_gives_each_request_its_adapters_output(llm, adapters, hf_outputs):
    prompts, requests, which = mixed_batch(adapters)
    got = tokens(llm.generate(prompts, GREEDY, lora_request=requests))
    assert got == expected(hf_outputs, prompts, which)


def test_two_slots_for_three_adapters_swap_and_give_the_same_outputs(adapters, hf_outputs):
    prompts, requests, which = mixed_batch(adapters)
    small = LLM(dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=2, use_tqdm=False)
    try:
        got = tokens(small.generate(prompts, GREEDY, lora_request=requests))
    finally:
        small.shutdown()
    assert got == expected(hf_outputs, prompts, which)


def test_prefix_caching_is_keyed_by_adapter(llm, adapters):
    system = "You answer questions about LoRA adapters in one line. " * 8
    prompt = system + "Q: what is a rank?\nA:"
    sql, chat = (LoRARequest(n, 1, adapters[n]) for n in ("sql", "chat"))
    first = llm.generate([prompt], GREEDY, lora_request=sql)[0]
    again = llm.generate([prompt], GREEDY, lora_request=sql)[0]
    other = llm.generate([prompt], GREEDY, lora_request=chat)[0]
    base = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= 16 * (len(again.prompt_token_ids) // 16 - 1)
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0


def bad_adapters(folder, good: str, hf_model) -> list[tuple[str, str, str]]:
    """(case, adapter folder, a fragment of the refusal) for adapters that cannot be served."""
    from peft import LoraConfig, get_peft_model

    def peft_adapter(name: str, **spec) -> str:
        model = get_peft_model(hf_model, LoraConfig(init_lora_weights=False, **spec))
        model.save_pretrained(str(folder / name))
        model.unload()
        return str(folder / name)

    shape = folder / "shape"
    shutil.copytree(good, shape)
    weights = load_file(str(shape / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, str(shape / "adapter_model.safetensors"))
    broken = folder / "broken"
    shutil.copytree(good, broken)
    (broken / "adapter_config.json").write_text("{not json")
    return [
        ("missing", str(folder / "nope"), "adapter_config.json is missing"),
        ("rank", peft_adapter("rank", r=32, target_modules=["q_proj"]), "above --max-lora-rank"),
        ("shape", str(shape), "do not fit the base model"),
        ("target", peft_adapter("target", r=8, target_modules=["lm_head"]), "not supported"),
        ("dora", peft_adapter("dora", r=8, target_modules=["q_proj"], use_dora=True), "use_dora"),
        ("config", str(broken), "not valid JSON"),
    ]


def test_the_server_serves_adapters_by_model_name_and_loads_them_at_runtime(
    adapters, hf_outputs, hf_tokenizer, hf_model, tmp_path
):
    key = "lora-test-key"
    modules = [f"{n}={adapters[n]}" for n in ("sql", "chat")]
    args = ["--dtype", "float32", "--enable-lora", "--lora-modules", *modules,
            "--allow-runtime-lora-updating", "--max-loras", "2",
            "--max-cpu-loras", "3"]  # fmt: skip
    bad = bad_adapters(tmp_path, adapters["sql"], hf_model)
    with ServerProcess(*args, api_key=key) as server:
        auth = {"Authorization": f"Bearer {key}"}
        http = httpx.Client(base_url=server.base_url, headers=auth, timeout=120)
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
        assert set(cards) == {MODEL, "sql", "chat"}
        assert cards["sql"]["parent"] == MODEL and cards[MODEL]["parent"] is None
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)

        def texts(model: str) -> list[str]:
            return [
                client.completions.create(
                    model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0
                )
                .choices[0]
                .text
                for p in PROMPTS
            ]

        def hf_texts(name: str | None) -> list[str]:
            return [hf_tokenizer.decode(t, skip_special_tokens=True) for t in hf_outputs[name]]

        for name in ("sql", "chat"):
            assert texts(name) == hf_texts(name), name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="mlp", prompt="Hi", max_tokens=2)

        body = {"lora_name": "mlp", "lora_path": adapters["mlp"]}
        assert httpx.post(server.base_url + "/v1/load_lora_adapter", json=body).status_code == 401
        start = time.perf_counter()
        loaded = http.post("/v1/load_lora_adapter", json=body)
        load_seconds = time.perf_counter() - start
        assert loaded.status_code == 200, loaded.text
        print(f"runtime adapter load: {load_seconds * 1000:.0f} ms")
        assert texts("mlp") == hf_texts("mlp")
        again = http.post("/v1/load_lora_adapter", json=body)
        assert again.status_code == 400 and "already" in again.json()["error"]["message"]

        for case, path, fragment in bad:
            resp = http.post("/v1/load_lora_adapter", json={"lora_name": case, "lora_path": path})
            assert resp.status_code == 400, (case, resp.text)
            assert fragment in resp.json()["error"]["message"], (case, resp.text)
        cards = {c["id"] for c in http.get("/v1/models").json()["data"]}
        assert cards == {MODEL, "sql", "chat", "mlp"}

        # Unloading lets a running request finish; new ones get the 404.
        stream = client.completions.create(
            model="mlp", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 200
        rest = [c for c in chunks if c.choices]
        assert rest[-1].choices[0].finish_reason == "length"
        streamed = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert streamed.startswith(hf_texts("mlp")[0])
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="mlp", prompt="Hi", max_tokens=2)
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
        assert http.get("/health").status_code == 200
        assert texts(MODEL) == hf_texts(None)


def test_a_bad_adapter_at_start_is_a_one_line_start_up_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "api", "serve", "--enable-lora", "--lora-modules",
         f"bad={tmp_path / 'nope'}", "--port", str(free_port())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "bad=" in proc.stderr and "adapter_config.json is missing" in proc.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--lora-modules", "nameonly"], "expected name=path"),
        (["--enable-lora", "--max-loras", "0"], "--max-loras 0"),
        (["--enable-lora", "--max-lora-rank", "0"], "--max-lora-rank 0"),
        (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras 2"),
        (["--enable-lora", "--lora-modules", json.dumps({"name": "a"})], '"path"'),
    ],
)
def test_bad_lora_flags_are_start_up_errors(argv, fragment):
    proc = subprocess.run([sys.executable, "-m", "api", "serve", *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr


def test_adapter_names_are_checked_at_start():
    from model_runner.config import EngineConfig, EngineConfigError
    from model_runner.lora import check_lora_config

    for modules in ((("a", "/x"), ("a", "/y")), (("", "/x"),)):
        with pytest.raises(EngineConfigError, match="its own name"):
            check_lora_config(EngineConfig(enable_lora=True, lora_modules=modules))
