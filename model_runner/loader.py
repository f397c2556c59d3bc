"""Building the model and filling its weights: GGUF, an HF safetensors folder, or dummy."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_runner.gguf_loader import GGUFBlocks, iter_gguf_weights, open_gguf
from model_runner.linear import Linear, WeightSource, as_float_tensor
from model_runner.linear_plan import LinearPlan
from model_runner.llama import LINEAR_SHARDS, KVScaleSlot, LinearSlot, LlamaForCausalLM
from model_runner.model_source import ModelConfig, ModelSource, ModelSourceError
from model_runner.parallel import TensorSlice

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
    sharded = model.tp.enabled
    if source.format == "dummy" and sharded:
        weights = dummy_weights_by_name(config, plan, max_position, seed)
        load_weights(model, weights, len(model.state_dict()), progress)
    elif source.format == "dummy":
        init_dummy_weights(model, seed, progress)
    elif source.format == "gguf":
        reader = gguf_reader if gguf_reader is not None else open_gguf(source.path)
        load_weights(model, iter_gguf_weights(reader, config), len(reader.tensors), progress)
    elif source.format == "safetensors":
        files = sorted(Path(source.path).glob("*.safetensors"))
        weights = iter_safetensors(files, lazy=sharded)
        from model_runner.quant.tensor_groups import group_quantized_tensors, refuse_quantized

        if plan.checkpoint is not None:  # NOTE: one source per quantized projection
            weights = group_quantized_tensors(weights, plan.checkpoint)
        else:
            weights = refuse_quantized(weights)
        load_weights(model, weights, count_safetensors(files), progress)
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


def iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) from every shard, one tensor at a time. `lazy`: a safetensors
    slice instead, valid until the next item, from which `take_part` reads only a rank's
    part (tensor parallel)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name) if lazy else f.get_tensor(name)


def take_part(source, part: TensorSlice | None) -> WeightSource:
    """This rank's `part` of a full weight, reading no more of it than the format allows:
    a safetensors slice or a memory-mapped array reads only the part; GGUF blocks run along
    a row, so rows are sliced as stored and columns after dequantizing."""
    if hasattr(source, "get_shape"):  # a lazy safetensors slice
        if part is None:
            return source[:]
        return (
            source[part.start : part.stop] if part.dim == 0 else source[:, part.start : part.stop]
        )
    if part is None:
        return source
    if isinstance(source, GGUFBlocks):
        if part.dim == 0:
            return GGUFBlocks(source.qtype, source.data[part.start : part.stop])
        source = source.dequantize()
    index = slice(part.start, part.stop)
    return source[index] if part.dim == 0 else source[:, index]


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
            if isinstance(slot, KVScaleSlot):
                slot.set(kv_scale_value(take_part(source, None)))
                continue
            source = take_part(source, slot.part)
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


def kv_scale_value(source: WeightSource) -> float:
    """A per-tensor KV-cache scale (one float); NaN for per-head or per-channel ones, which
    only an FP8 cache would read (`check_kv_scales`)."""
    tensor = as_float_tensor(source)
    return float(tensor.float().reshape(())) if tensor.numel() == 1 else math.nan


def check_kv_scales(model: LlamaForCausalLM) -> None:
    """Refuse checkpoint KV scales an FP8 cache cannot take (not one float per layer)."""
    for layer in model.layers:
        if any(math.isnan(s) for s in layer.kv_scales):
            raise ModelSourceError(
                f"layer {layer.index}: the checkpoint's k/v scales are not per-tensor (one "
                "float per layer), as tokenmill's FP8 KV cache needs; use --kv-cache-dtype auto"
            )


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


def dummy_weights_by_name(
    config: ModelConfig, plan: LinearPlan, max_position: int, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights `init_dummy_weights` draws for the whole (one-rank) model, in its order
    and by Hugging Face name, so that a tensor-parallel rank loads its parts of the very
    weights one rank would hold. NOTE: the order comes from the one-rank model built on
    the meta device (no memory); each full tensor is drawn, handed out, and dropped."""
    full = LlamaForCausalLM(config, replace(plan, device=torch.device("meta"), tp=None),
                            max_position)  # fmt: skip
    device = plan.device
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, DUMMY_STD, generator=generator)

    for name, param in full.named_parameters():
        if param.dim() == 1 and "bias" not in name:
            tensor = torch.ones(param.shape, dtype=param.dtype, device=device)
        else:
            tensor = normal(param.shape, param.dtype)
        if name.endswith("qkv_proj.bias"):  # one tensor for the q, k and v biases
            layer = name.split(".")[1]
            biases = tensor.split(full.layers[0].qkv_proj.output_sizes)
            for module, bias in zip(("q", "k", "v"), biases, strict=True):
                yield f"model.layers.{layer}.self_attn.{module}_proj.bias", bias
        else:
            yield _hf_param_name(name), tensor
    tied = config.tie_word_embeddings
    for name, linear in full.named_modules():
        if not isinstance(linear, Linear):
            continue
        dtype = getattr(linear.method, "weight", torch.empty(0)).dtype
        for shard, rows in enumerate(linear.output_sizes):
            weight = normal((rows, linear.in_features), dtype)
            if name == "lm_head":
                yield ("model.embed_tokens.weight" if tied else "lm_head.weight"), weight
            else:
                _, layer, attr = name.split(".")
                yield f"model.layers.{layer}.{_HF_MODULES[(attr, shard)]}.weight", weight


_HF_MODULES = {target: module for module, target in LINEAR_SHARDS.items()}


def _hf_param_name(name: str) -> str:
    """A one-rank model's plain parameter name -> its Hugging Face weight name."""
    if name == "norm":
        return "model.norm.weight"
    if name == "embed_tokens":
        return "model.embed_tokens.weight"
    return f"model.{name}.weight"  # layers.N.input_layernorm, layers.N.post_attention_layernorm
