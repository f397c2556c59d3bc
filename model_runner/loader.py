"""Building the model and filling its weights: GGUF, an HF safetensors folder, or dummy."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_runner.gguf_loader import iter_gguf_weights, open_gguf
from model_runner.linear import WeightSource, as_float_tensor
from model_runner.linear_plan import LinearPlan
from model_runner.llama import LinearSlot, LlamaForCausalLM
from model_runner.model_source import ModelConfig, ModelSource, ModelSourceError

log = logging.getLogger(__name__)


def load_model(
    source: ModelSource,
    config: ModelConfig,
    plan: LinearPlan,
    max_position: int,
    *,
    seed: int = 0,
    progress: bool = True,
    gguf_reader=None,
) -> LlamaForCausalLM:
    """Build the model as `plan` says and load (or, for dummy, draw) its weights."""
    model = LlamaForCausalLM(config, plan, max_position)
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
    finalize_linears(model)
    return model.eval()


def finalize_linears(model: LlamaForCausalLM) -> None:
    """Kernel layouts for every projection (the plan already self-checked packing)."""
    for linear in model.linears():
        linear.finalize()


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
    weights: Iterable[tuple[str, WeightSource]],
    total: int,
    progress: bool = True,
) -> None:
    """Hand each (Hugging Face name, weight) to its slot; every parameter must be filled."""
    filled: dict[int, int] = {}
    with torch.no_grad():
        for name, source in tqdm(
            weights, total=total, desc="Loading weights", disable=not progress
        ):
            slot = model.weight_slot(name)
            if slot is None:
                if name.endswith(".bias") and ".layers." in name:
                    raise ModelSourceError(f"the model has no place for the weight {name}")
                continue
            if isinstance(slot, LinearSlot):
                slot.linear.load(slot.shard, source)
                continue
            tensor = as_float_tensor(source)
            target = slot.param[slot.start : slot.end]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelSourceError(
                    f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            filled[id(slot.param)] = filled.get(id(slot.param), 0) + tensor.numel()
    missing = [n for n, p in model.named_parameters() if filled.get(id(p), 0) != p.numel()]
    if missing:
        raise ModelSourceError(f"weights missing or incomplete: {', '.join(missing[:5])}")


DUMMY_STD = 0.02  # NOTE: x @ W over a unit-RMS x gives std 0.02 * sqrt(in): ~1-2 at 4k-19k


def init_dummy_weights(model: LlamaForCausalLM, seed: int, progress: bool = True) -> None:
    """Seeded random weights (normal, std 0.02; norms at 1) for benchmarks and tests.

    NOTE: drawn on the model's device by a generator on that device, in the storage dtype,
    one tensor at a time: no CPU init and copy, so an 8B model is ready in seconds on a GPU.
    The same seed gives the same weights on one device type (CPU and CUDA streams differ).
    """
    device = model.embedding.device
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(rows, cols, dtype=dtype, device=device)
        return out.normal_(0.0, DUMMY_STD, generator=generator)

    with torch.no_grad():
        for name, param in tqdm(
            list(model.named_parameters()), desc="Initializing dummy weights", disable=not progress
        ):
            if param.dim() == 1 and "bias" not in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, DUMMY_STD, generator=generator)
        for linear in model.linears():
            weight = getattr(linear.method, "weight", None)
            dtype = weight.dtype if weight is not None else torch.float32
            for shard, rows in enumerate(linear.output_sizes):
                linear.load(shard, normal(rows, linear.in_features, dtype))
