"""The engine's frozen configuration, built once by the CLI and passed everywhere."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class EngineConfigError(ValueError):
    """A setting (or model) this engine or machine cannot serve: a user error. Start-up
    prints its message as one line and exits 2; the message names the flag or path to fix."""


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config (parsed and checked in model_runner/spec_config.py)."""

    method: str = "ngram"  # ngram | draft_model
    num_speculative_tokens: int = 3  # K: tokens proposed per step for one sequence
    # draft_model: a smaller model with the target's vocabulary (a .gguf file, an HF folder,
    # or a config.json / bundled config name for random weights); "dummy": random weights
    model: str | None = None
    load_format: str = "auto"  # auto | dummy
    prompt_lookup_max: int = 4  # the longest suffix n-gram looked up in the sequence
    prompt_lookup_min: int = 2  # the shortest one
    # Back-off: a sequence whose last `backoff_window` proposals had fewer than
    # `backoff_min_acceptance` of their tokens accepted decodes `backoff_steps` steps plainly.
    backoff_window: int = 4
    backoff_min_acceptance: float = 0.25
    backoff_steps: int = 16
    # No sequence proposes in a step planned while more than this many decode (vLLM's
    # name): a speculating row steps synchronously, which a large batch pays for in full.
    # None: no cut-off.
    disable_by_batch_size: int | None = 4


@dataclass(frozen=True)
class EngineConfig:
    """Every engine setting; field names follow vLLM's CLI flags."""

    model: str | None = None  # None: the embedded SmolLM2 GGUF; else a .gguf file or an HF folder
    load_format: str = "auto"  # auto | gguf | safetensors | dummy
    dtype: str = "auto"  # auto (CPU: model_runner.cpu_profile; CUDA: bfloat16) | float32 | ...
    # auto | gguf | int8 | int4 | none | awq | gptq | fp8 (model_runner.linear_plan)
    quantization: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    max_model_len: int | None = None  # None: min(model's max positions, 8192)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory: float | None = None  # GiB on CPU (default 2 GiB there)
    # auto (the activation dtype) | fp8 | fp8_e4m3 (model_runner.kv_cache)
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    max_logprobs: int = 20
    enforce_eager: bool = False
    async_scheduling: bool = True  # overlap: plan step N+1 while step N runs (actors/scheduler)
    cpu_packed_batch: int = 32  # CPU: packed GEMM weights for steps of this many rows (0: off)
    # CPU 4-bit weights: steps of up to this many rows take the 4-bit GEMM, larger ones a
    # dense bf16 copy. None: measured once per CPU model; -1: always 4-bit, no dense copy.
    cpu_int4_max_rows: int | None = None
    # CPU quantized GEMMs: auto (int8-dot where the CPU has AVX-512 VNNI), int8-dot, int4.
    cpu_quant_kernel: str = "auto"
    # Results of a request independent of what else runs in its steps (CPU): 4-bit GEMMs at
    # every row count, one attention call per sequence. Slower; see the README.
    batch_invariant: bool = False
    served_model_name: str | None = None
    max_waiting: int = 1024  # waiting-queue bound: beyond it, 503 + Retry-After
    hf_config_path: str | None = None  # for load_format=dummy: a config.json path or folder
    structured_outputs_timeout: float = 10.0  # seconds a grammar may compile before a 400
    grammar_cache_mib: int = 512  # compiled grammars kept for reuse (pinned ones beyond it)
    grammar_compile_niceness: int = 5  # Linux niceness of the compile threads (0: as the step)
    # vLLM's --skip-tokenizer-init: no tokenizer anywhere; token-id prompts and outputs only
    skip_tokenizer_init: bool = False
    # Multi-LoRA (vLLM's flags): adapters by name, mixed in one step (model_runner.lora)
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT adapter folder)
    max_lora_rank: int = 16
    max_loras: int = 4  # adapters resident on the device, so at most this many in one step
    max_cpu_loras: int | None = None  # adapters kept in host memory (LRU); None: max_loras
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter, /v1/unload_...
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding
    # Tensor parallelism (model_runner.parallel): one model over this many ranks (processes)
    tensor_parallel_size: int = 1
    collective_timeout: float = 60.0  # seconds a collective may wait for a peer rank


DEFAULT_CPU_KV_CACHE_GIB = 2.0
DEFAULT_MAX_MODEL_LEN_CAP = 8192


def cache_dir() -> Path:
    """Where tokenmill keeps what it derives once per machine (converted tokenizers, the CPU
    profile): `$TOKENMILL_CACHE_DIR`, default ~/.cache/tokenmill."""
    return Path(os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill")


def kernel_build_dir() -> Path:
    """Where the CPU's compiled kernels are kept (`kernels.int8_dot_linear`)."""
    return cache_dir() / "kernels"


def resolve_device(config: EngineConfig) -> torch.device:
    """`auto` picks CUDA when it is available, else the CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError("--device cuda: no CUDA GPU is available; use --device cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device | None = None) -> torch.dtype:
    """`auto` is bfloat16 on CUDA; on the CPU, what `cpu_profile` decided for this CPU model."""
    dtype, auto_reason = resolve_dtype_with_reason(config, device)
    if auto_reason is not None:
        log.info("%s", auto_reason)
    return dtype


def resolve_dtype_with_reason(
    config: EngineConfig, device: torch.device | None = None
) -> tuple[torch.dtype, str | None]:
    """The dtype, and why `--dtype auto` on the CPU picked it (None otherwise): a caller that
    checks more settings first logs the reason once they passed."""
    if config.dtype == "auto":
        device = device or resolve_device(config)
        if device.type == "cuda":
            return torch.bfloat16, None
        from model_runner.cpu_profile import cpu_profile

        p = cpu_profile()
        return _DTYPES[p.dtype], f"--dtype auto on {p.cpu}: {p.dtype} ({p.reason})"
    try:
        return _DTYPES[config.dtype], None
    except KeyError:
        choices = ", ".join(_DTYPES)
        raise ValueError(f"unknown dtype {config.dtype!r}; one of auto, {choices}") from None


def resolve_max_model_len(config: EngineConfig, max_position_embeddings: int) -> int:
    """The configured max_model_len, or the model's limit capped at 8192."""
    if config.max_model_len is not None:
        if config.max_model_len > max_position_embeddings:
            raise EngineConfigError(
                f"--max-model-len {config.max_model_len} is above the model's context length "
                f"{max_position_embeddings}; use --max-model-len {max_position_embeddings} or less"
            )
        return config.max_model_len
    return min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
