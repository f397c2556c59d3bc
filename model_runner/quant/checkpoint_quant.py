"""A checkpoint's `quantization_config` (config.json), parsed and checked before any weight
loads (or, in older AutoGPTQ / AutoAWQ folders, quantize_config.json / quant_config.json).
Every variant tokenmill cannot serve is a start-up error naming the field and value.

| quant_method         | served                                                           |
|----------------------|------------------------------------------------------------------|
| `awq`                | GEMM layout (`version` gemm), 4-bit, zero points, group 32-128+  |
| `gptq`               | 4- or 8-bit, `desc_act` true/false (`g_idx`), sym or not, v1/v2  |
| `fp8`                | float8_e4m3fn weights, per-tensor scales; dynamic or static acts |
| `compressed-tensors` | `float-quantized` / `naive-quantized` FP8 weights (tensor or     |
|                      | channel scales), activations dynamic per token or static tensor  |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model_runner.model_source import ModelSourceError

GROUP_QUANT_BITS = {"awq": (4,), "gptq": (4, 8)}
MIN_GROUP_SIZE = 32  # the W4A16 kernel's K step divides every group


class CheckpointQuantError(ModelSourceError):
    """A quantization_config (or quantized tensor) tokenmill cannot serve (exit 2)."""


@dataclass(frozen=True)
class CheckpointQuant:
    """How a checkpoint's projections are stored (`method`: awq | gptq | fp8)."""

    method: str
    bits: int = 4
    group_size: int = 128  # -1: one group over all input features
    desc_act: bool = False  # GPTQ: input features permuted by g_idx
    zero_offset: int = 0  # GPTQ v1 stores zero - 1 (AutoGPTQ): 1; v2 and AWQ: 0
    weight_strategy: str = "tensor"  # FP8: tensor | channel
    static_activations: bool = False  # FP8: a checkpoint `input_scale` per projection


def default_quant(method: str) -> CheckpointQuant:
    """The layout of `--quantization awq|gptq|fp8` on float weights (dummy: AWQ-shaped)."""
    return CheckpointQuant(method, bits=8 if method == "fp8" else 4)


def read_checkpoint_quant(config_path: Path | None) -> CheckpointQuant | None:
    """The quantization of the checkpoint whose config.json is `config_path` (None: dense)."""
    if config_path is None or config_path.suffix == ".gguf" or not config_path.is_file():
        return None
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # NOTE: model_config_from_hf reports an unreadable config
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc is None:
        return _read_sidecar(config_path.parent)
    if not isinstance(qc, dict):
        raise CheckpointQuantError(f"{config_path}: quantization_config is not an object")
    return parse_quantization_config(qc, str(config_path))


# Older AutoGPTQ / AutoAWQ folders keep their settings beside config.json, often without a
# quant_method: AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json (w_bit,
# q_group_size, version), the files vLLM reads for gptq and awq.
SIDECARS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}
AWQ_ONLY_KEYS = ("w_bit", "q_group_size", "zero_point", "version")


def _read_sidecar(folder: Path) -> CheckpointQuant | None:
    for name, default in SIDECARS.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            qc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointQuantError(f"{path}: not readable JSON ({e})") from e
        if not isinstance(qc, dict):
            raise CheckpointQuantError(f"{path}: not a JSON object")
        if "quant_method" not in qc:
            awq = default == "awq" or any(k in qc for k in AWQ_ONLY_KEYS)
            qc = qc | {"quant_method": "awq" if awq else "gptq"}
        return parse_quantization_config(qc, str(path))
    return None


def parse_quantization_config(qc: dict, where: str = "quantization_config") -> CheckpointQuant:
    method = str(qc.get("quant_method", "")).lower()
    if method in GROUP_QUANT_BITS:
        return _group_quant(qc, method, where)
    if method == "fp8":
        return _fp8(qc, where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise CheckpointQuantError(
        f"{where}: unsupported quant_method {qc.get('quant_method')!r}; tokenmill serves awq, "
        "gptq, fp8 and compressed-tensors (FP8)"
    )


def _bad(where: str, field: str, value, served: str) -> CheckpointQuantError:
    return CheckpointQuantError(f"{where}: unsupported {field} {value!r}; {served}")


def _group_quant(qc: dict, method: str, where: str) -> CheckpointQuant:
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if bits not in GROUP_QUANT_BITS[method]:
        raise _bad(where, f"{method} bits", bits, f"served: {GROUP_QUANT_BITS[method]}")
    if not isinstance(group, int) or not (
        group == -1 or (group > 0 and group % MIN_GROUP_SIZE == 0)
    ):
        raise _bad(where, f"{method} group_size", group, "served: -1 or a multiple of 32")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _bad(where, "awq version", qc.get("version"), "served: gemm")
        if not qc.get("zero_point", True):
            raise _bad(where, "awq zero_point", False, "served: true")
        return CheckpointQuant("awq", bits, group)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _bad(where, "gptq checkpoint_format", fmt, "served: gptq, gptq_v2")
    if qc.get("is_marlin_format"):  # NOTE: AutoGPTQ's Marlin repack (tensors B and s)
        raise _bad(where, "gptq is_marlin_format", True, "served: the gptq layout (false)")
    desc_act = bool(qc.get("desc_act", False))
    _check_dynamic(qc, where, bits, group, desc_act)
    return CheckpointQuant("gptq", bits, group, desc_act, zero_offset=int(fmt == "gptq"))


def _check_dynamic(qc: dict, where: str, bits, group, desc_act) -> None:
    """GPTQModel's `dynamic` per-module overrides: skipping modules ("-:" rules, left in
    float) is served; a rule that changes bits, group_size or desc_act is not."""
    for rule, override in (qc.get("dynamic") or {}).items():
        if str(rule).startswith("-:") or not isinstance(override, dict):
            continue
        base = {"bits": bits, "group_size": group, "desc_act": desc_act}
        changed = {k: v for k, v in override.items() if k in base and v != base[k]}
        if changed:
            raise _bad(where, f"gptq dynamic rule {rule!r}", changed,
                       "served: one bits/group_size/desc_act for every module")  # fmt: skip


def _fp8(qc: dict, where: str) -> CheckpointQuant:
    if qc.get("weight_block_size") is not None:
        raise _bad(where, "fp8 weight_block_size", qc["weight_block_size"],
                   "served: per-tensor or per-channel scales")  # fmt: skip
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise _bad(where, "fp8 activation_scheme", scheme, "served: dynamic, static")
    return CheckpointQuant("fp8", 8, static_activations=scheme == "static")


def _compressed_tensors(qc: dict, where: str) -> CheckpointQuant:
    fmt = qc.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _bad(where, "compressed-tensors format", fmt,
                   "served: float-quantized and naive-quantized FP8")  # fmt: skip
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _bad(where, "compressed-tensors config_groups count", len(groups), "served: 1")
    weights = groups[0].get("weights") or {}
    acts = groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise _bad(where, "compressed-tensors weights", weights, "served: 8-bit float (FP8)")
    for part, scheme in (("weights", weights), ("input_activations", acts or {})):
        if not scheme.get("symmetric", True):  # NOTE: zero points tokenmill would not read
            raise _bad(where, f"compressed-tensors {part} symmetric", False, "served: true")
    strategy = weights.get("strategy", "tensor")
    if strategy not in ("tensor", "channel"):
        raise _bad(where, "compressed-tensors weight strategy", strategy,
                   "served: tensor, channel")  # fmt: skip
    static = False
    if acts is not None:
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise _bad(where, "compressed-tensors input_activations", acts, "served: FP8")
        static = not acts.get("dynamic", True)
        if static and acts.get("strategy", "tensor") != "tensor":
            raise _bad(where, "static input_activations strategy", acts.get("strategy"),
                       "served: tensor")  # fmt: skip
    return CheckpointQuant("fp8", 8, weight_strategy=strategy, static_activations=static)
