"""The multi-LoRA flags of `tokenmill serve` (vLLM's names) and how they are read."""

from __future__ import annotations

import argparse
import json
import os

_RUNTIME_ENV = ("TOKENMILL_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    p.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help='adapters served by name: name=path, or JSON {"name": ..., "path": ..., '
        '"base_model_name": ...}; each a PEFT adapter folder',
    )
    p.add_argument("--max-lora-rank", type=int, default=16, help="the highest adapter rank")
    p.add_argument(
        "--max-loras", type=int, default=4,
        help="adapters resident on the device, so at most this many in one step",
    )  # fmt: skip
    p.add_argument(
        "--max-cpu-loras", type=int, default=None,
        help="adapters kept in host memory (LRU); default: --max-loras",
    )  # fmt: skip
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
        f"{_RUNTIME_ENV[0]}=1 or {_RUNTIME_ENV[1]}=1)",
    )


def parse_lora_modules(values: list[str]) -> tuple[tuple[str, str], ...]:
    """`name=path` or vLLM's JSON form; raises ValueError naming a malformed one."""
    modules = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'--lora-modules {value!r}: JSON needs "name" and "path"'
                ) from None
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules {value!r}: expected name=path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ValueError(f"--lora-modules {value!r}: the name and path must be non-empty")
        modules.append((name, path))
    return tuple(modules)


def runtime_lora_updating(flag: bool) -> bool:
    """The flag, or either environment variable set to a true value."""
    truthy = {"1", "true", "yes", "on"}
    return flag or any(os.environ.get(n, "").strip().lower() in truthy for n in _RUNTIME_ENV)
