"""Start-up errors a user can cause: the real CLI prints one line naming the flag or path,
exits 2, shows no traceback (unless --log-level debug) and leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import free_port

TIMEOUT_S = 120
LLAMA_CONFIG = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 96,
}  # fmt: skip


def serve(*argv: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run `python -m api serve ARGV`; also the pids still alive that it started."""
    marker = f"TOKENMILL_STARTUP_TEST={uuid.uuid4().hex}"
    env = dict(os.environ, TOKENMILL_STARTUP_TEST=marker.partition("=")[2])
    proc = subprocess.run(
        [sys.executable, "-m", "api", "serve", *argv],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
    )  # fmt: skip
    return proc, _pids_with_environ(marker)


def _pids_with_environ(entry: str) -> list[int]:
    """Processes whose environment holds `entry` (every child inherits it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def assert_one_line_error(proc, leftover: list[int], *expected: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenmill: error: "), proc.stderr
    for text in expected:
        assert text in lines[0]
    assert not leftover, f"processes left behind: {leftover}"
    return lines[0]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Model paths a user might mistype or mix up."""
    root = tmp_path_factory.mktemp("models")
    hf = root / "bert"
    hf.mkdir()
    _write(hf / "config.json", '{"model_type": "bert"}')
    (hf / "model.safetensors").write_bytes(b"")
    no_tok = root / "no_tokenizer"
    no_tok.mkdir()
    _write(no_tok / "config.json", json.dumps(LLAMA_CONFIG))
    (no_tok / "model.safetensors").write_bytes(b"")
    broken = root / "broken_config"
    broken.mkdir()
    _write(broken / "config.json", "{not json")
    (broken / "model.safetensors").write_bytes(b"")
    empty = root / "empty"
    empty.mkdir()
    quant = root / "unknown_quant"
    quant.mkdir()
    qc = {"quant_method": "bitnet", "bits": 2}
    _write(quant / "config.json", json.dumps(LLAMA_CONFIG | {"quantization_config": qc}))
    (quant / "model.safetensors").write_bytes(b"")
    return {
        "root": str(root),
        "not_gguf": _write(root / "notes.gguf", "plain text, not a model\n"),
        "text": _write(root / "notes.txt", "plain text\n"),
        "bert": str(hf),
        "no_tokenizer": str(no_tok),
        "broken_config": str(broken),
        "empty": str(empty),
        "unknown_quant": str(quant),
    }


# (case id, argv with {placeholders} from `files`, texts the one line must contain)
FAST_CASES = [
    ("missing-file", ["/missing.gguf"], ["/missing.gguf", "does not exist"]),
    ("missing-model-flag", ["--model", "/no/such/dir"], ["/no/such/dir"]),
    ("not-a-gguf", ["{not_gguf}"], ["notes.gguf", "not a GGUF file"]),
    ("not-a-model", ["{text}"], ["notes.txt", "neither a .gguf file"]),
    ("empty-folder", ["{empty}"], ["empty", "safetensors"]),
    ("unsupported-arch", ["{bert}"], ["'bert'", "unsupported model_type"]),
    ("broken-config", ["{broken_config}"], ["config.json", "JSON"]),
    ("no-tokenizer", ["{no_tokenizer}"], ["tokenizer", "no_tokenizer"]),
    ("model-differs", ["a.gguf", "--model", "b.gguf"], ["--model", "differ"]),
    ("max-num-seqs-0", ["--max-num-seqs", "0"], ["--max-num-seqs 0"]),
    ("batched-tokens-0", ["--max-num-batched-tokens", "0"], ["--max-num-batched-tokens"]),
    ("max-model-len-0", ["--max-model-len", "0"], ["--max-model-len 0"]),
    ("block-size-odd", ["--block-size", "24"], ["--block-size 24", "power of two"]),
    ("block-size-4", ["--block-size", "4"], ["--block-size 4", "not supported"]),
    ("port-too-high", ["--port", "70000"], ["--port 70000"]),
    ("port-0", ["--port", "0"], ["--port 0"]),
    ("gpu-util-0", ["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization"]),
    ("gpu-util-1.5", ["--gpu-memory-utilization", "1.5"], ["(0, 1]"]),
    ("kv-memory-0", ["--kv-cache-memory", "0"], ["--kv-cache-memory"]),
    ("kv-memory-negative", ["--kv-cache-memory", "-1"], ["--kv-cache-memory -1"]),
    ("max-waiting-0", ["--max-waiting", "0"], ["--max-waiting"]),
    ("hf-config-without-dummy", ["--hf-config-path", "{root}"], ["--load-format dummy"]),
    ("dummy-without-config", ["{empty}", "--load-format", "dummy"], ["--hf-config-path"]),
    ("dummy-bad-config-path", ["--load-format", "dummy", "--hf-config-path", "{empty}"],
     ["--hf-config-path", "config.json"]),
    ("host-unknown", ["--host", "no-such-host.invalid"], ["--host no-such-host.invalid"]),
    ("quant-method-unknown", ["{unknown_quant}"], ["quant_method 'bitnet'", "config.json"]),
    ("awq-of-a-float-checkpoint", ["{no_tokenizer}", "--quantization", "awq"],
     ["--quantization awq", "quantization_config"]),
]  # fmt: skip


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def fast_results(files) -> dict[str, tuple[subprocess.CompletedProcess, list[int]]]:
    """Every FAST_CASES run, a few at once (each is mostly imports, ~1-5 s)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {
            case: pool.submit(serve, *(a.format(**files) for a in argv))
            for case, argv, _ in FAST_CASES
        }
        return {case: run.result() for case, run in runs.items()}


@pytest.mark.parametrize(("case", "expected"), [(c[0], c[2]) for c in FAST_CASES],
                         ids=[c[0] for c in FAST_CASES])  # fmt: skip
def test_checked_before_the_model_loads(fast_results, case, expected):
    assert_one_line_error(*fast_results[case], *expected)


def test_a_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(*serve(str(path)), "encoder.gguf", "unsupported GGUF architecture 'bert'")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_model_file(tmp_path):
    model = tmp_path / "locked.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0)
    assert_one_line_error(*serve(str(model)), "locked.gguf", "not readable")


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu():
    assert_one_line_error(*serve("--device", "cuda"), "--device cuda", "no CUDA GPU")


def test_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, leftover = serve("--port", str(port))
    assert_one_line_error(proc, leftover, f"--port {port}", "already in use")


# NOTE: only the engine knows the model's context length and the KV cache's size; these
# start the engine process (~20 s each on a busy 2-core machine), which refuses before the
# weights load and reports back to the API process.
ENGINE_CASES = [
    ("max-model-len-above-context", ["--max-model-len", "100000"],
     ["--max-model-len 100000", "context length 8192"]),
    ("kv-cache-too-small", ["--kv-cache-memory", "0.0001"],
     ["--kv-cache-memory", "--max-model-len 8192", "too small"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in ENGINE_CASES],
                         ids=[c[0] for c in ENGINE_CASES])  # fmt: skip
def test_refused_by_the_engine(argv, expected):
    proc, leftover = serve("--port", str(free_port()), *argv)
    assert_one_line_error(proc, leftover, *expected)


def test_debug_log_level_shows_the_traceback():
    proc, leftover = serve("/missing.gguf", "--log-level", "debug")
    assert proc.returncode == 2 and not leftover
    assert "Traceback" in proc.stderr and "ModelSourceError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tokenmill: error: model path")
