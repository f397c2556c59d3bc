"""Building the model and filling its weights: GGUF, an HF safetensors folder, or dummy."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels.linear import (
    PACKED_ATTR,
    pack_linear_weight,
    packed_matches_plain,
    packing_available,
)
from model_runner.gguf_loader import iter_gguf_weights, open_gguf
from model_runner.llama import LlamaForCausalLM
from model_runner.model_source import ModelConfig, ModelSource, ModelSourceError

log = logging.getLogger(__name__)


def load_model(
    source: ModelSource,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    *,
    seed: int = 0,
    progress: bool = True,
    gguf_reader=None,
    packed_batch: int = 0,
) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and load (or, for dummy, draw) its weights.

    On the CPU in float32 or bfloat16, `packed_batch` >= MIN_PACKED_BATCH also keeps packed
    weights for steps of that many rows (`kernels.linear`).
    """
    model = LlamaForCausalLM(config, dtype, device, max_position)
    if source.format == "dummy":
        init_dummy_weights(model, seed, progress)
    elif source.format == "gguf":
        reader = gguf_reader if gguf_reader is not None else open_gguf(source.path)
        load_weights(model, iter_gguf_weights(reader, config), len(reader.tensors), progress)
    elif source.format == "safetensors":
        files = sorted(Path(source.path).glob("*.safetensors"))
        load_weights(model, iter_safetensors(files), count_safetensors(files), progress)
    else:
        raise ModelSourceError(f"unknown format {source.format!r}")
    if device.type == "cpu" and dtype == torch.float32:
        store_linear_weights_column_major(model)
    if device.type == "cpu" and packed_batch >= MIN_PACKED_BATCH:
        pack_linear_weights(model, packed_batch)
    return model.eval()


# The [out, in] weights that go through F.linear (lm_head may be the tied embedding).
LINEAR_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


@torch.no_grad()
def store_linear_weights_column_major(model: LlamaForCausalLM) -> None:
    """Keep each linear weight's shape but store it transposed (`W.t()` contiguous).

    NOTE: F.linear(x, W) computes x @ W.t(); with W.t() contiguous, MKL's fp32 GEMM needs
    no transposed operand: 1.2-1.8x faster at 8-32 rows on the CPU, the same at 1 or 2048
    rows, bit-identical to torch.mm(x, W.t()). bf16 gains nothing, so it is left as is.
    A tied embedding is relaid too: its row lookups (a few rows per token) become strided.
    """
    for weight in linear_weights(model):
        weight.data = weight.data.t().contiguous().t()


# Below 8 rows packed GEMMs are no faster than plain ones.
MIN_PACKED_BATCH = 8


def linear_weights(model: LlamaForCausalLM) -> Iterator[torch.Tensor]:
    """Each distinct linear weight once (a tied LM head is the embedding, seen once)."""
    seen: set[int] = set()
    for module in model.modules():
        for name in LINEAR_WEIGHTS:
            weight = getattr(module, name, None)
            if isinstance(weight, torch.nn.Parameter) and id(weight) not in seen:
                seen.add(id(weight))
                yield weight


def pack_linear_weights(model: LlamaForCausalLM, batch: int) -> bool:
    """Attach packed copies of every linear weight for `batch`-row steps (kernels.linear).

    Skipped (False) for a dtype no library packs, or when the copies (about 1.3x the
    weights) would take more than half of the memory still available. A self-check against
    `F.linear` turns packing off again should the library disagree.
    """
    weights = list(linear_weights(model))
    need = int(1.3 * sum(w.numel() * w.element_size() for w in weights))
    if not packing_available(weights[0].dtype):
        log.info("no packed GEMM for %s here: plain GEMMs", weights[0].dtype)
        return False
    if need > available_memory_bytes() // 2:
        log.warning("packed GEMM weights (%.1f GiB) skipped: too little free memory", need / 2**30)
        return False
    for weight in weights:
        pack_linear_weight(weight, batch)
    if not packed_matches_plain(weights[0]):
        log.warning("the packed GEMM disagrees with F.linear here: packing turned off")
        for weight in weights:
            delattr(weight, PACKED_ATTR)
        return False
    return True


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def count_safetensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(list(f.keys()))
    return total


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, one tensor at a time."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(
    model: LlamaForCausalLM,
    weights: Iterable[tuple[str, np.ndarray | torch.Tensor]],
    total: int,
    progress: bool = True,
) -> None:
    """Copy each (Hugging Face name, array) into its slot; every parameter must be filled."""
    filled: dict[int, int] = {}
    with torch.no_grad():
        for name, array in tqdm(weights, total=total, desc="Loading weights", disable=not progress):
            slot = model.weight_slot(name)
            if slot is None:
                if name.endswith(".bias") and ".layers." in name:
                    raise ModelSourceError(f"the model has no place for the weight {name}")
                continue
            param, start, end = slot
            if isinstance(array, np.ndarray):
                array = torch.from_numpy(np.require(array, requirements=["C", "W"]))
            tensor = array
            target = param[start:end]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelSourceError(
                    f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            filled[id(param)] = filled.get(id(param), 0) + tensor.numel()
    missing = [n for n, p in model.named_parameters() if filled.get(id(p), 0) != p.numel()]
    if missing:
        raise ModelSourceError(f"weights missing or incomplete: {', '.join(missing[:5])}")


def init_dummy_weights(model: LlamaForCausalLM, seed: int, progress: bool = True) -> None:
    """Seeded random weights (normal, std 0.02; norms at 1) for benchmarks and tests."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    with torch.no_grad():
        for name, param in tqdm(params, desc="Initializing dummy weights", disable=not progress):
            if param.dim() == 1 and "bias" not in name:
                param.fill_(1.0)
                continue
            values = torch.empty(param.shape, dtype=torch.float32).normal_(
                0.0, 0.02, generator=generator
            )
            param.copy_(values)
