"""PEFT LoRA adapter folders: read, check against the base model, keep as float32 A/B pairs.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (what peft's
`save_pretrained` writes). Every adapter that cannot be served exactly is refused with a
message naming the folder and the reason (`LoraAdapterError`): the start-up turns it into
a start-up error, the runtime load endpoint into a 400.

The adapter adds `scale * (x @ A.T) @ B.T` to a target projection's output, with
`scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` for rsLoRA (peft's `use_rslora`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_runner.llama import LINEAR_SHARDS

# peft's module names -> (the fused projection of the model, its shard)
TARGETS: dict[str, tuple[str, int]] = {
    name.rpartition(".")[2]: where for name, where in LINEAR_SHARDS.items()
}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# Config fields whose non-default values change the math: refused rather than ignored.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "lora_bias": (False, None),
}


class LoraAdapterError(ValueError):
    """An adapter that cannot be served; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the layer count and each target's (in, out) features."""

    num_layers: int
    modules: dict[str, tuple[int, int]]  # peft module name -> (in_features, out_features)


@dataclass
class LoraAdapter:
    path: str
    rank: int
    scale: float
    # (layer, peft module name) -> (A [r, in], B [out, r]), float32 on the host
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def read_adapter(path: str, base: BaseShapes, max_rank: int) -> LoraAdapter:
    """Read and check the PEFT adapter folder at `path`."""
    folder = Path(path)

    def refuse(reason: str) -> LoraAdapterError:
        return LoraAdapterError(f"LoRA adapter {path!r}: {reason}")

    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise refuse(f"{f.name} is missing (a PEFT adapter folder has both files)")
    rank, scale = _rank_and_scale(config_file, max_rank, refuse)
    weights = _read_weights(weights_file, base, rank, refuse)
    return LoraAdapter(path=path, rank=rank, scale=scale, weights=weights)


def _rank_and_scale(config_file: Path, max_rank: int, refuse) -> tuple[int, float]:
    """adapter_config.json: the rank and the delta's scale, refusing what changes the math."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise refuse(f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
    for name, allowed in _UNSUPPORTED.items():
        if config.get(name, allowed[0]) not in allowed:
            raise refuse(f"{name}={config[name]!r} is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise refuse(f"r={rank!r} must be a positive integer")
    if rank > max_rank:
        raise refuse(f"its rank {rank} is above --max-lora-rank {max_rank}")
    if not isinstance(alpha, int | float):
        raise refuse(f"lora_alpha={alpha!r} must be a number")
    return rank, float(alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def _read_weights(weights_file: Path, base: BaseShapes, rank: int, refuse) -> dict:
    """adapter_model.safetensors: (layer, module) -> (A, B) in float32, each checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise refuse(f"adapter_model.safetensors cannot be read ({e})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    supported = ", ".join(TARGETS)
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise refuse(f"weight {key!r} targets a module that is not supported "
                         f"(supported: {supported})")  # fmt: skip
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGETS:
            raise refuse(f"target module {module!r} is not supported (supported: {supported})")
        if layer >= base.num_layers:
            raise refuse(f"weight {key!r}: the base model has {base.num_layers} layers")
        pairs.setdefault((layer, module), {})[ab] = tensor
    if not pairs:
        raise refuse("adapter_model.safetensors holds no LoRA weights")
    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise refuse(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        in_features, out_features = base.modules[module]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise refuse(
                f"layer {layer} {module}: shapes A {tuple(a.shape)} and B {tuple(b.shape)} do "
                f"not fit the base model (expected A ({rank}, {in_features}), "
                f"B ({out_features}, {rank}))"
            )
        weights[layer, module] = (a.float().contiguous(), b.float().contiguous())
    return weights
