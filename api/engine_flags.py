"""The engine flags of `tokenmill serve` (model, capacity, step; vLLM's names)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
QUANTIZATIONS = ("auto", "gguf", "int8", "int4", "none", "awq", "gptq", "fp8")  # linear_plan


def add_engine_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_capacity_args(p)
    _add_step_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What is loaded, on which device, in which formats."""
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="activation dtype; auto: bfloat16 on CUDA, and on CPUs that compute bf16 natively "
        "and faster (measured once per CPU model), else float32 (the exact mode)",
    )
    p.add_argument(
        "--quantization",
        "-q",
        default="auto",
        choices=QUANTIZATIONS,
        help="weight format; auto: a checkpoint's quantization_config (awq, gptq, fp8), a "
        "GGUF's Q4_0/Q4_1/Q8_0 as 4-bit planes with bfloat16 activations on the CPU, else "
        "none (dense weights in the activation dtype); fp8 of a float checkpoint quantizes "
        "it at load",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="load no tokenizer: prompts only as token ids (/v1/completions), outputs as "
        "choices[].token_ids with empty text; text prompts and chats get a 400",
    )
    p.add_argument(
        "--hf-config-path",
        default=None,
        help="config for --load-format dummy: a config.json, its folder, or a shipped shape "
        "(llama-3.1-8b, qwen2.5-7b, tiny-llama)",
    )


def _add_capacity_args(p: argparse.ArgumentParser) -> None:
    """Sequence lengths, batch sizes, the KV cache and the waiting queue."""
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV-cache size in GiB on the CPU (default 2)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "fp8", "fp8_e4m3"),
        help="auto: the activation dtype; fp8 (fp8_e4m3): float8_e4m3fn K/V with per-layer "
        "scales (the checkpoint's k_scale/v_scale, else 1.0), half the bytes of bf16",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument(
        "--async-scheduling",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="plan step N+1 while step N runs (--no-async-scheduling: one step at a time)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or '
        '\'{"method": "draft_model", "model": "DRAFT.gguf", "num_speculative_tokens": 3}\'',
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="waiting-queue bound; beyond it requests get 503 + Retry-After",
    )


def _add_step_args(p: argparse.ArgumentParser) -> None:
    """How a model step runs: compiled or eager, CPU weight layouts, batch invariance."""
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the model over this many ranks (GPUs, or processes on the CPU)",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=60.0,
        help="seconds a tensor-parallel rank waits for the others in one step before the "
        "engine is failed",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no compiled decode steps on the CPU (CUDA graphs are not built yet, so CUDA "
        "steps are always eager)",
    )
    p.add_argument(
        "--cpu-packed-batch",
        type=int,
        default=32,
        help="CPU: pre-packed GEMM weights for steps of this many rows, capped at "
        "--max-num-seqs (float32: MKL, steps of more than half as many rows padded up; "
        "bfloat16: oneDNN, any rows); 0: off",
    )
    p.add_argument(
        "--cpu-int4-max-rows",
        type=int,
        default=None,
        help="CPU, 4-bit weights: steps of up to this many rows take the 4-bit GEMM, larger "
        "ones a dense bf16 copy (default: measured once per CPU model); -1: always the "
        "4-bit GEMM, no dense copy (batch-invariant results, less memory)",
    )
    p.add_argument(
        "--cpu-quant-kernel",
        choices=("auto", "int8-dot", "int4"),
        default="auto",
        help="CPU, quantized weights: int8-dot (int8 activations and integer dot products, "
        "AVX-512 VNNI; compiled once per machine) or int4 (torch's 4-bit GEMM); auto: "
        "int8-dot where it runs",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="CPU: a request's tokens do not depend on what else is batched with it (4-bit "
        "GEMMs at every row count, one attention call per sequence); slower",
    )
