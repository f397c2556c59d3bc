"""Tensor parallelism on the CPU (gloo, 2 ranks) against one rank on the same dummy weights:
offline and over HTTP, under batching, chunked prefill, preemption and prefix caching; a
rank that dies; shapes that do not divide.

NOTE: each TP=2 engine is 5-6 processes on a 2-core machine: one per module and case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from api import LLM
from model_runner.config import EngineConfigError
from tests.conftest import ServerProcess, settled_stats
from tests.integration.tensor_parallel_cases import (
    GQA_ONE_KV_HEAD,
    MAX_TOKENS,
    NINE_HEADS,
    Generation,
    assert_matches,
    engine_kwargs,
    offline_generations,
    prompts,
    write_config,
)

# Per rank: fp32 blocks of the tiny config hold 1 KV head: 8 KiB; ~26 blocks for ten
# sequences of up to 72 tokens (5 blocks each) preempts.
SMALL_KV_GIB = 0.0002
CHUNKED = dict(max_num_batched_tokens=48, max_num_seqs=8)


@pytest.fixture(scope="module")
def gqa_config(tmp_path_factory) -> str:
    return write_config(tmp_path_factory.mktemp("gqa") / "gqa-1kv", GQA_ONE_KV_HEAD)


def _tp1(config: str) -> list[Generation]:
    with LLM(**engine_kwargs(hf_config_path=config), use_tqdm=False) as llm:
        return offline_generations(llm)


@pytest.fixture(scope="module")
def tiny_tp1() -> list[Generation]:
    return _tp1("tiny-llama")


@pytest.fixture(scope="module")
def gqa_tp1(gqa_config) -> list[Generation]:
    return _tp1(gqa_config)


@pytest.fixture(scope="module")
def tiny_tp2():
    """TP=2 with a KV cache small enough to preempt and a step budget that chunks prompts."""
    kwargs = engine_kwargs(hf_config_path="tiny-llama", tensor_parallel_size=2,
                           kv_cache_memory=SMALL_KV_GIB, **CHUNKED)  # fmt: skip
    with LLM(**kwargs, use_tqdm=False) as llm:
        yield llm


def test_tiny_tp2_matches_tp1_under_batching_preemption_and_prefix_caching(tiny_tp1, tiny_tp2):
    batched = offline_generations(tiny_tp2)
    stats = tiny_tp2.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert assert_matches(tiny_tp1, batched) >= 0.9 * len(tiny_tp1) * MAX_TOKENS


def test_tp2_with_ngram_speculation_matches_tp1(tiny_tp1):
    """Rank 0 samples every position of a speculating row and broadcasts the tokens; each
    rank verifies the proposals itself, so the ranks stay in step."""
    spec = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "disable_by_batch_size": None,
    }  # NOTE: the batch is larger than the default 4
    kwargs = engine_kwargs(hf_config_path="tiny-llama", tensor_parallel_size=2,
                           speculative_config=spec)  # fmt: skip
    with LLM(**kwargs, use_tqdm=False) as llm:
        got = offline_generations(llm)
        stats = settled_stats(llm)
    assert stats.spec.num_drafts > 0 and stats.spec.num_accepted_tokens > 0
    assert stats.num_blocks_in_use == 0
    assert assert_matches(tiny_tp1, got) >= 0.9 * len(tiny_tp1) * MAX_TOKENS


def test_tp2_alone_equals_tp2_batched(tiny_tp2):
    """Each prompt alone (no batching, no preemption) gives what the batched run gave."""
    batched = offline_generations(tiny_tp2)
    alone = []
    for i in range(len(prompts())):
        one = _first_only(tiny_tp2, i)
        alone.append(one)
    assert assert_matches(batched, alone) >= 0.9 * len(batched) * MAX_TOKENS


def _first_only(llm, i: int) -> Generation:
    from api import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    (out,) = llm.generate([{"prompt_token_ids": prompts()[i]}], params)
    c = out.outputs[0]
    margins = [lp.top[0][2] - lp.top[1][2] for lp in c.logprobs]
    return Generation(c.token_ids, [lp.logprob for lp in c.logprobs], margins)


def test_kv_heads_fewer_than_ranks_replicated(gqa_config, gqa_tp1):
    reference = gqa_tp1
    kwargs = engine_kwargs(hf_config_path=gqa_config, tensor_parallel_size=2)
    with LLM(**kwargs, use_tqdm=False) as llm:
        got = offline_generations(llm)
    assert assert_matches(reference, got) >= 0.9 * len(reference) * MAX_TOKENS


def test_heads_that_do_not_divide_refused(tmp_path):
    """The engine refuses before any rank joins a process group (so before any waits)."""
    from model_runner.config import EngineConfig
    from model_runner.runner import ModelRunner

    config = write_config(tmp_path / "nine-heads", NINE_HEADS)
    cfg = EngineConfig(**engine_kwargs(hf_config_path=config, tensor_parallel_size=2))
    with pytest.raises(EngineConfigError, match="--tensor-parallel-size 2 does not divide the mo"):
        ModelRunner(cfg, progress=False)


def test_cli_refuses_before_any_process_starts():
    """The default model (9 heads, 3 KV heads): one line, exit 2, no worker started."""
    cmd = [sys.executable, "-m", "api", "serve", "--port", "1", "-tp", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    message = "--tensor-parallel-size 2 does not divide the model's 9 attention heads"
    assert message in done.stderr and "Traceback" not in done.stderr


# --- over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny-llama", "gqa-1kv"])
def tp2_server(request, gqa_config):
    """A TP=2 server on each config, and the TP=1 generations it must match."""
    config = "tiny-llama" if request.param == "tiny-llama" else gqa_config
    reference = request.getfixturevalue("tiny_tp1" if config == "tiny-llama" else "gqa_tp1")
    srv = ServerProcess("--load-format", "dummy", "--hf-config-path", config,
                        "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "256",
                        "--enforce-eager", "-tp", "2", "--max-num-batched-tokens", "48",
                        "--collective-timeout", "20")  # fmt: skip
    try:
        srv.wait_healthy()
        yield srv, reference
    finally:
        srv.stop()


def _complete(srv, prompt: list[int]) -> Generation:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "logprobs": 1}  # fmt: skip
    r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    return Generation(choice["token_ids"], choice["logprobs"]["token_logprobs"], [])


def test_http_tp2_matches_tp1(tp2_server):
    srv, reference = tp2_server
    results: list[Generation | None] = [None] * len(prompts())

    def one(i: int) -> None:
        results[i] = _complete(srv, prompts()[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert assert_matches(reference, results) >= 0.9 * len(reference) * MAX_TOKENS


def test_rank_death_fails_requests_and_health(tp2_server):
    """Killing rank 1 mid-stream: the stream ends with an error within seconds, /health
    answers 503, and the server exits (code 1) for its service manager to restart it."""
    srv, _ = tp2_server
    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
    rank1 = _child_with(srv.proc.pid, "--process rank1")
    body = {"prompt": prompts()[0], "max_tokens": 200,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    events = []
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data:")))
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        events += [line for line in lines if line.startswith("data:")]
        ended = time.monotonic() - killed
    health = httpx.get(srv.base_url + "/health", timeout=5)
    assert health.status_code == 503 and "rank1" in health.text
    assert ended < 15, ended
    assert events[-1] == "data: [DONE]"
    # NOTE: the error comes from rank 0's failed step or from the supervisor, which first
    errors = [json.loads(e[5:]) for e in events[:-1] if '"error"' in e]
    assert errors, events[-3:]
    assert srv.proc.wait(30) == 1


def _child_with(parent: int, needle: str) -> int:
    """The pid of `parent`'s child process whose command line contains `needle`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and needle in cmdline:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} runs {needle!r}")
