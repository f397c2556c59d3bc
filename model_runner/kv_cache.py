"""The paged KV cache tensors: sizing, allocation and block copies (copy-on-write)."""

from __future__ import annotations

import math

import torch

from kernels.kv_cache import indexable
from model_runner.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig, EngineConfigError
from model_runner.model_source import ModelConfig
from model_runner.step_upload import to_device

GIB = 1 << 30
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(
    config: EngineConfig, dtype: torch.dtype, device: torch.device | None = None
) -> torch.dtype:
    """`--kv-cache-dtype`: auto is the activation dtype; fp8 (= fp8_e4m3) stores K/V as
    float8_e4m3fn with per-layer scales (the checkpoint's k_scale/v_scale, else 1.0), half
    the bytes of bf16. NOTE: an FP8 cache turns off the CPU's decode context (and so its
    fused and compiled decode layers): the paged kernels read the FP8 blocks themselves."""
    check_kv_cache_dtype(config, device)
    return dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn


def check_kv_cache_dtype(config: EngineConfig, device: torch.device | None = None) -> None:
    """Refuse an unknown --kv-cache-dtype, or FP8 on a GPU whose Triton has no e4m3."""
    if config.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise EngineConfigError(
            f"unknown --kv-cache-dtype {config.kv_cache_dtype!r}; one of {KV_CACHE_DTYPES}"
        )
    fp8 = config.kv_cache_dtype != "auto"
    if fp8 and device is not None and device.type == "cuda" and _capability(device) < (8, 9):
        raise EngineConfigError(
            f"--kv-cache-dtype {config.kv_cache_dtype} needs a GPU with FP8 (e4m3) support "
            "(compute capability 8.9+: Ada, Hopper) for the Triton cache kernels; use "
            "--kv-cache-dtype auto here"
        )


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def max_useful_blocks(config: EngineConfig, max_model_len: int) -> int:
    """Enough blocks for max_num_seqs sequences of max_model_len tokens: more is waste."""
    return config.max_num_seqs * math.ceil(max_model_len / config.block_size)


def num_blocks_for_cpu(
    config: EngineConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    max_model_len: int,
    extra_block_bytes: int = 0,
) -> int:
    """From `kv_cache_memory` GiB (default 2), capped by `max_useful_blocks`.
    `extra_block_bytes`: what else each block holds (a draft model's K and V)."""
    gib = DEFAULT_CPU_KV_CACHE_GIB if config.kv_cache_memory is None else config.kv_cache_memory
    per_block = bytes_per_block(model, config.block_size, dtype) + extra_block_bytes
    blocks = int(gib * GIB) // per_block
    budget = f"{gib:g} GiB"
    _check_one_request_fits(blocks, per_block, config, max_model_len, "--kv-cache-memory", budget)
    return min(blocks, max_useful_blocks(config, max_model_len))


def num_blocks_for_cuda(
    config: EngineConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    max_model_len: int,
    device: torch.device,
    extra_block_bytes: int = 0,
) -> int:
    """From `gpu_memory_utilization` of the device, after the profiling forward has run.

    NOTE: call after a forward at the largest batch so that max_memory_allocated holds the
    peak of weights plus activations.
    """
    if config.kv_cache_memory is not None:
        return num_blocks_for_cpu(config, model, dtype, max_model_len, extra_block_bytes)
    _, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    free_for_cache = total * config.gpu_memory_utilization - peak
    per_block = bytes_per_block(model, config.block_size, dtype) + extra_block_bytes
    blocks = int(max(free_for_cache, 0)) // per_block
    budget = (
        f"{config.gpu_memory_utilization:g} "
        f"({max(free_for_cache, 0) / GIB:.2f} GiB after the weights and activations)"
    )
    flag = "--gpu-memory-utilization"
    _check_one_request_fits(blocks, per_block, config, max_model_len, flag, budget)
    return min(blocks, max_useful_blocks(config, max_model_len))


def kv_cache_summary(
    num_blocks: int, model: ModelConfig, block_size: int, dtype: torch.dtype, max_model_len: int
) -> str:
    """One log line: the cache's blocks and the concurrency they allow at max_model_len
    (vLLM's "Maximum concurrency for N tokens per request: Xx")."""
    tokens = num_blocks * block_size
    gib = num_blocks * bytes_per_block(model, block_size, dtype) / GIB
    per_request = math.ceil(max_model_len / block_size)
    return (
        f"KV cache: {num_blocks} blocks of {block_size} tokens ({tokens} tokens, {gib:.2f} GiB); "
        f"maximum concurrency for {max_model_len} tokens per request: "
        f"{num_blocks / per_request:.2f}x"
    )


def check_fits_in_memory(
    blocks: int,
    model: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    available: int,
    extra_block_bytes: int = 0,
) -> None:
    """A CPU cache larger than the free memory would be swapped or OOM-killed, not refused."""
    needed = blocks * (bytes_per_block(model, block_size, dtype) + extra_block_bytes)
    if needed > available:
        raise EngineConfigError(
            f"--kv-cache-memory: the KV cache needs {needed / GIB:.2f} GiB but only "
            f"{available / GIB:.2f} GiB of memory is available; lower --kv-cache-memory"
        )


def _check_one_request_fits(
    blocks: int, per_block: int, config: EngineConfig, max_model_len: int, flag: str, budget: str
) -> None:
    """The cache must hold one request of max_model_len tokens (EngineConfigError)."""
    needed = math.ceil(max_model_len / config.block_size)
    if blocks >= needed:
        return
    raise EngineConfigError(
        f"the KV cache is too small for one --max-model-len {max_model_len} request: it needs "
        f"{needed * per_block / GIB:.3f} GiB, {flag} {budget} holds "
        f"{blocks * config.block_size} tokens; raise {flag} or lower --max-model-len"
    )


class KVCache:
    """Per-layer K and V caches [num_blocks, block_size, num_kv_heads, head_dim].

    NOTE: one zeroed tensor [layers, 2, blocks, ...] backs all of them (zeros, so that never
    written slots that the attention gathers and masks hold no NaN), which turns a block
    copy into one indexing op for every layer. Block `num_blocks` (one past the blocks the
    scheduler hands out) is the reserved dummy block that padded graph rows write.
    """

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dummy_block = num_blocks
        shape = (
            model.num_layers,
            2,
            num_blocks + 1,
            block_size,
            model.num_kv_heads,
            model.head_dim,
        )
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.storage[i, 0], self.storage[i, 1]) for i in range(model.num_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy every layer's K and V from block src to block dst, for each (src, dst)."""
        if not copies:
            return
        device = self.storage.device
        src = to_device([s for s, _ in copies], torch.long, device)
        dst = to_device([d for _, d in copies], torch.long, device)
        storage = indexable(self.storage)  # NOTE: FP8 blocks move as their uint8 bits
        storage[:, :, dst] = storage[:, :, src]
