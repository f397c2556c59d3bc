"""The KV-cache line logged once the cache is sized: blocks, tokens and the concurrency they
allow at --max-model-len."""

from __future__ import annotations

import logging

import torch

from model_runner.config import EngineConfig
from model_runner.kv_cache import bytes_per_block, kv_cache_summary
from model_runner.model_source import model_config_from_hf, resolve_hf_config_path
from model_runner.runner import ModelRunner


def test_summary_numbers():
    mc = model_config_from_hf(resolve_hf_config_path("llama-3.1-8b"))
    assert bytes_per_block(mc, 16, torch.bfloat16) == 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB
    line = kv_cache_summary(1000, mc, 16, torch.bfloat16, 4096)
    assert line == (
        "KV cache: 1000 blocks of 16 tokens (16000 tokens, 1.95 GiB); "
        "maximum concurrency for 4096 tokens per request: 3.91x"
    )


def test_runner_logs_it_once(caplog):
    cfg = EngineConfig(load_format="dummy", hf_config_path="tiny-llama", dtype="float32",
                       kv_cache_memory=0.001, max_model_len=256)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="model_runner.runner"):
        runner = ModelRunner(cfg, progress=False)
    lines = [r.getMessage() for r in caplog.records if "maximum concurrency" in r.getMessage()]
    assert len(lines) == 1
    expected = f"maximum concurrency for 256 tokens per request: {runner.num_blocks / 16:.2f}x"
    assert lines[0].startswith(f"KV cache: {runner.num_blocks} blocks of 16 tokens")
    assert lines[0].endswith(expected)


def test_fp8_kv_cache_needs_e4m3_on_the_gpu(monkeypatch):
    """--kv-cache-dtype fp8 on a GPU below compute capability 8.9 (Triton has no e4m3
    there) is a start-up error naming the flag, not a kernel compile error mid-profile."""
    import pytest

    from model_runner.config import EngineConfigError
    from model_runner.kv_cache import check_kv_cache_dtype, resolve_kv_cache_dtype

    cfg = EngineConfig(kv_cache_dtype="fp8")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(EngineConfigError, match="--kv-cache-dtype fp8 needs a GPU"):
        resolve_kv_cache_dtype(cfg, torch.bfloat16, cuda)
    check_kv_cache_dtype(EngineConfig(), cuda)  # auto: any GPU
    assert resolve_kv_cache_dtype(cfg, torch.bfloat16, torch.device("cpu")) == torch.float8_e4m3fn
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_kv_cache_dtype(cfg, torch.bfloat16, cuda) == torch.float8_e4m3fn
