"""The paged KV cache tensors: sizing, allocation and block copies (copy-on-write)."""

from __future__ import annotations

import math

import torch

from model_runner.config import DEFAULT_CPU_KV_CACHE_GIB, EngineConfig
from model_runner.model_source import ModelConfig

GIB = 1 << 30


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def max_useful_blocks(config: EngineConfig, max_model_len: int) -> int:
    """Enough blocks for max_num_seqs sequences of max_model_len tokens: more is waste."""
    return config.max_num_seqs * math.ceil(max_model_len / config.block_size)


def num_blocks_for_cpu(
    config: EngineConfig, model: ModelConfig, dtype: torch.dtype, max_model_len: int
) -> int:
    """From `kv_cache_memory` GiB (default 2), capped by `max_useful_blocks`."""
    gib = DEFAULT_CPU_KV_CACHE_GIB if config.kv_cache_memory is None else config.kv_cache_memory
    blocks = int(gib * GIB) // bytes_per_block(model, config.block_size, dtype)
    return _checked(min(blocks, max_useful_blocks(config, max_model_len)), gib)


def num_blocks_for_cuda(
    config: EngineConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    max_model_len: int,
    device: torch.device,
) -> int:
    """From `gpu_memory_utilization` of the device, after the profiling forward has run.

    NOTE: call after a forward at the largest batch so that max_memory_allocated holds the
    peak of weights plus activations.
    """
    if config.kv_cache_memory is not None:
        return num_blocks_for_cpu(config, model, dtype, max_model_len)
    _, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    free_for_cache = total * config.gpu_memory_utilization - peak
    blocks = int(max(free_for_cache, 0)) // bytes_per_block(model, config.block_size, dtype)
    return _checked(min(blocks, max_useful_blocks(config, max_model_len)), free_for_cache / GIB)


def _checked(blocks: int, gib: float) -> int:
    if blocks < 1:
        raise ValueError(f"no room for a single KV-cache block in {gib:.3f} GiB")
    return blocks


class KVCache:
    """Per-layer K and V caches [num_blocks, block_size, num_kv_heads, head_dim].

    NOTE: one zeroed tensor [layers, 2, blocks, ...] backs all of them (zeros, so that never
    written slots that the attention gathers and masks hold no NaN), which turns a block
    copy into one indexing op for every layer.
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
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.storage[i, 0], self.storage[i, 1]) for i in range(model.num_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy every layer's K and V from block src to block dst, for each (src, dst)."""
        if not copies:
            return
        device = self.storage.device
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
        self.storage[:, :, dst] = self.storage[:, :, src]
