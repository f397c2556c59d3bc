"""Joining a quantized checkpoint's per-projection tensors into one weight source.

The loader iterates a safetensors folder tensor by tensor; an AWQ projection is three
tensors (`qweight`, `qzeros`, `scales`), a GPTQ one four (with `g_idx`), an FP8 one two or
three (`weight`, `weight_scale`, `input_scale`). `group_quantized_tensors` collects them by
module and yields (module + ".weight", source) once a module is complete, so the model's
weight slots see one [N, K] weight per projection as for a float checkpoint. Anything else
passes through unchanged. NOTE: a module missing a part is an error only at the end (the
parts may sit in different files).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from kernels.fp8_linear import FP8
from model_runner.quant.checkpoint_quant import CheckpointQuant, CheckpointQuantError
from model_runner.quant.fp8_weights import fp8_tensor
from model_runner.quant.group_quant import awq_tensor, gptq_tensor

# method -> (required parts, optional parts, the source builder)
LAYOUTS = {
    "awq": (("qweight", "qzeros", "scales"), (), awq_tensor),
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",), gptq_tensor),
    "fp8": (("weight", "weight_scale"), ("input_scale",), fp8_tensor),
}


def _part_of(name: str, tensor, method: str) -> tuple[str, str] | None:
    """(module, part) when `name` is a quantized part of a projection, else None."""
    module, _, part = name.rpartition(".")
    required, optional, _ = LAYOUTS[method]
    if part not in required + optional:
        return None
    if method == "fp8" and part == "weight" and getattr(tensor, "dtype", None) != FP8:
        return None  # NOTE: norms, embeddings and ignored projections stay float
    return module, part


def group_quantized_tensors(
    weights: Iterable[tuple[str, torch.Tensor]], quant: CheckpointQuant
) -> Iterator[tuple[str, object]]:
    """(name, tensor) pairs -> the same with each quantized projection's parts joined."""
    required, optional, build = LAYOUTS[quant.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        found = _part_of(name, tensor, quant.method)
        if found is None:
            yield name, tensor
            continue
        module, part = found
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if all(p in parts for p in required + optional):
            yield f"{module}.weight", build(module, pending.pop(module), quant)
    for module, parts in pending.items():
        missing = [p for p in required if p not in parts]
        if missing and not (quant.method == "fp8" and "weight" not in parts):
            raise CheckpointQuantError(
                f"{module}: missing {', '.join(missing)} ({quant.method} needs "
                f"{', '.join(required)})"
            )
        if missing:  # FP8 scales of a float weight: no FP8 weight to scale
            raise CheckpointQuantError(f"{module}: {', '.join(parts)} without an FP8 weight")
        yield f"{module}.weight", build(module, parts, quant)


QUANTIZED_PARTS = ("qweight", "qzeros", "weight_scale", "weight_packed")


def refuse_quantized(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """A float checkpoint's (name, tensor) pairs, unchanged; a quantized tensor (a checkpoint
    whose config.json lost its quantization_config) is a clear error, not garbage weights."""
    for name, tensor in weights:
        if name.rpartition(".")[2] in QUANTIZED_PARTS:
            raise CheckpointQuantError(
                f"{name} is a quantized tensor, but config.json has no quantization_config "
                "(nor is there a quantize_config.json or quant_config.json beside it)"
            )
        yield name, tensor
