"""The linear-method seam: shards, the 4-bit method's per-step choice, `--quantization auto`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quantize

from model_runner.gguf_loader import GGUFBlocks
from model_runner.linear import DenseLinear, Linear
from model_runner.linear_plan import (
    LinearPlan,
    QuantizationError,
    _quant_kernel,
    _warn_if_slow,
    check_quantization,
    resolve_quantization,
)
from model_runner.quant.quantized_linear import QuantizedLinear

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16 = torch.bfloat16


def _gguf(kind: str, rows: int, cols: int = 64, seed: int = 0) -> GGUFBlocks:
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.1
    qtype = GGMLQuantizationType[kind]
    return GGUFBlocks(qtype, quantize(weights, qtype))


def _qkv(mode: str, max_rows: int | None, shards) -> Linear:
    plan = LinearPlan(BF16, CPU, mode, int4_max_rows=max_rows)
    linear = plan.linear(64, [s.shape[0] for s in shards])
    for i, shard in enumerate(shards):
        linear.load(i, shard)
    linear.finalize()
    return linear


def _reference(shards) -> torch.Tensor:
    parts = [s.dequantize() if isinstance(s, GGUFBlocks) else s.numpy() for s in shards]
    return torch.from_numpy(np.concatenate(parts))


def test_fused_shards_land_at_their_offsets():
    shards = [_gguf("Q4_1", 64, seed=1), _gguf("Q4_1", 32, seed=2), _gguf("Q4_1", 32, seed=3)]
    linear = _qkv("gguf", None, shards)
    assert linear.offsets == (0, 64, 96) and linear.out_features == 128
    assert isinstance(linear.method, QuantizedLinear) and linear.method.packed is not None
    x = torch.randn(3, 64).bfloat16()
    expected = x.float() @ _reference(shards).t()
    torch.testing.assert_close(linear(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_rows_above_max_rows_take_the_dense_copy(monkeypatch):
    linear = _qkv("gguf", 4, [_gguf("Q8_0", 96)])
    method = linear.method
    assert method.planes == 2 and isinstance(method.dense, DenseLinear)
    calls = []
    real = method.dense.apply
    monkeypatch.setattr(method.dense, "apply", lambda x, b=None: calls.append(len(x)) or real(x, b))
    x = torch.randn(9, 64).bfloat16()
    small, large = linear(x[:4]), linear(x)
    assert calls == [9]  # 4 rows: the 4-bit GEMM; 9 rows: the dense copy
    torch.testing.assert_close(small.float(), large[:4].float(), rtol=2e-2, atol=2e-2)
    assert "dense above 4 rows" in method.kind


def test_mixed_or_unsupported_gguf_types_are_served_dense(caplog):
    mixed = [_gguf("Q4_1", 64), _gguf("Q8_0", 32), _gguf("Q4_1", 32)]
    with caplog.at_level(logging.DEBUG):
        linear = _qkv("gguf", None, mixed)
    assert linear.method.packed is None and linear.method.kind == "dense (dequantized)"
    x = torch.randn(2, 64).bfloat16()
    expected = x.float() @ _reference(mixed).t()
    torch.testing.assert_close(linear(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_float_weights_are_quantized_at_load(mode):
    torch.manual_seed(0)
    shards = [torch.randn(64, 64) * 0.1, torch.randn(32, 64) * 0.1]
    linear = _qkv(mode, None, shards)
    assert linear.method.planes == (2 if mode == "int8" else 1)
    x = torch.randn(4, 64).bfloat16()
    expected = x.float() @ torch.cat(shards).t()
    error = (linear(x).float() - expected).norm() / expected.norm()
    assert error < (0.02 if mode == "int8" else 0.15)


def test_a_projection_missing_rows_is_refused():
    linear = LinearPlan(BF16, CPU).linear(64, [32, 32])
    linear.load(0, torch.randn(32, 64))
    with pytest.raises(ValueError, match="got 32 of 64"):
        linear.finalize()


def test_auto_quantization_table(caplog):
    gguf4 = {"Q4_1", "Q8_0", "F32"}
    assert resolve_quantization("auto", CPU, BF16, "gguf", gguf4) == "gguf"
    assert resolve_quantization("auto", CPU, torch.float32, "gguf", gguf4) == "none"
    assert resolve_quantization("auto", CPU, torch.float16, "gguf", gguf4) == "none"
    assert resolve_quantization("auto", CPU, BF16, "gguf", {"Q6_K", "F32"}) == "none"
    assert resolve_quantization("auto", CPU, BF16, "safetensors", set()) == "none"
    assert resolve_quantization("auto", CUDA, BF16, "gguf", gguf4) == "none"
    assert resolve_quantization("int4", CPU, torch.float32, "safetensors", set()) == "int4"
    with caplog.at_level(logging.WARNING):
        _warn_if_slow("int4", "int8-dot", torch.float32)  # takes float32 activations as fast
        assert not caplog.text
        _warn_if_slow("int4", "int4", torch.float32)
    assert "slow" in caplog.text and "bfloat16" in caplog.text


def test_the_kernel_choice(monkeypatch):
    from kernels import int8_dot_linear
    from model_runner.config import EngineConfig

    monkeypatch.setattr(int8_dot_linear, "available", lambda build_dir: True)
    auto, torch_int4 = EngineConfig(), EngineConfig(cpu_quant_kernel="int4")
    assert _quant_kernel(auto, "gguf", CPU) == "int8-dot"
    assert _quant_kernel(torch_int4, "gguf", CPU) == "int4"
    assert _quant_kernel(auto, "none", CPU) == "int4"  # (unused: nothing is quantized)
    monkeypatch.setattr(int8_dot_linear, "available", lambda build_dir: False)
    assert _quant_kernel(auto, "gguf", CPU) == "int4"
    with pytest.raises(QuantizationError, match="AVX-512 VNNI"):
        _quant_kernel(EngineConfig(cpu_quant_kernel="int8-dot"), "gguf", CPU)


def test_quantizations_the_model_or_device_cannot_serve_are_refused():
    with pytest.raises(QuantizationError, match="needs a .gguf model"):
        check_quantization("gguf", CPU, "safetensors")
    with pytest.raises(QuantizationError, match="CPU only"):
        check_quantization("int4", CUDA, "gguf")
    with pytest.raises(QuantizationError, match="unknown quantization"):
        check_quantization("fp4", CPU, "gguf")
    check_quantization("none", CUDA, "gguf")


def test_checkpoint_formats_resolve_and_are_checked(monkeypatch):
    from model_runner.quant.checkpoint_quant import CheckpointQuant

    awq, fp8 = CheckpointQuant("awq"), CheckpointQuant("fp8", 8)
    assert resolve_quantization("auto", CPU, BF16, "safetensors", set(), awq) == "awq"
    assert resolve_quantization("awq", CPU, BF16, "safetensors", set(), awq) == "awq"
    assert resolve_quantization("none", CPU, BF16, "safetensors", set(), awq) == "none"
    assert resolve_quantization("fp8", CPU, BF16, "safetensors", set()) == "fp8"  # dynamic
    assert resolve_quantization("awq", CPU, BF16, "dummy", set()) == "awq"  # AWQ-shaped
    with pytest.raises(QuantizationError, match="needs a checkpoint quantized with AWQ"):
        check_quantization("awq", CPU, "safetensors")
    with pytest.raises(QuantizationError, match="the checkpoint is fp8-quantized"):
        check_quantization("gptq", CPU, "safetensors", fp8)
    with pytest.raises(QuantizationError, match="--tensor-parallel-size"):
        check_quantization("auto", CPU, "safetensors", awq, tensor_parallel_size=2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(QuantizationError, match="compute capability 8.9"):
        check_quantization("auto", CUDA, "safetensors", fp8)
    check_quantization("auto", CUDA, "safetensors", awq)  # W4A16 runs on any CUDA GPU
