"""Quantized weights on one GPU (issue 19): the Llama-3.1-8B shape with dummy weights in
bf16, FP8 (weights and activations, `--quantization fp8`) and AWQ-shaped 4-bit
(`--quantization awq`: round-to-nearest, group 128), each measured decode-heavy,
prefill-heavy and as the batch-1 decode step, beside TRT-LLM's published FP8 H200 figures.

    python load_tests/bench_quantized.py OUTDIR [--budget-s 360] [--dry-run]

Writes OUTDIR/quantized.json and OUTDIR/quantized.md after every measurement. Each one
runs in a `gpu_workers.py` subprocess (so each frees the GPU on exit); `--dry-run` runs
the tiny config on the CPU (the same code paths, tiny sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "gpu_workers.py"
MODES = {"bf16": {}, "fp8": {"quantization": "fp8"}, "awq-4bit": {"quantization": "awq"}}
# TensorRT-LLM v1.0 published throughput, Llama-3.1-8B FP8 on one H200, output tok/s.
TRTLLM_H200_FP8 = {"decode_heavy": 17744, "prefill_heavy": 3538}
FP8_DECODE_TARGET = 1.4  # FP8 decode-heavy throughput over bf16's, same run


def sizes(dry: bool) -> dict:
    """TRT-LLM's shapes (1000 in / 1000 out, 2048 in / 128 out); fewer requests than its
    max-throughput runs so that three formats fit the budget."""
    if dry:
        return {"config": "tiny-llama", "device": "cpu", "dtype": "float32", "decode": (24, 8),
                "prefill": (48, 2), "n_decode": 4, "n_prefill": 4, "context": 32, "steps": 3,
                "kv_gib": 0.05, "max_model_len": 256, "modes": ["eager"]}  # fmt: skip
    return {"config": "llama-3.1-8b", "device": "cuda", "dtype": "bfloat16",
            "decode": (1000, 1000), "prefill": (2048, 128), "n_decode": 512, "n_prefill": 256,
            "context": 1024, "steps": 20, "kv_gib": None, "max_model_len": 3072,
            "modes": ["graphs"]}  # fmt: skip


def engine(s: dict, mode: str) -> dict:
    kw = {"load_format": "dummy", "hf_config_path": s["config"], "device": s["device"],
          "dtype": s["dtype"], "skip_tokenizer_init": True, "max_num_seqs": 256,
          "max_num_batched_tokens": 8192, "max_model_len": s["max_model_len"]}  # fmt: skip
    if s["kv_gib"] is not None:
        kw["kv_cache_memory"] = s["kv_gib"]
    return kw | MODES[mode]


def worker_calls(s: dict, mode: str) -> list[tuple[str, dict]]:
    """The `gpu_workers.py` runs of one format: offline throughput, then the b1 step."""
    workloads = [
        {"name": "decode_heavy", "n": s["n_decode"], "input_len": s["decode"][0],
         "output_len": s["decode"][1]},
        {"name": "prefill_heavy", "n": s["n_prefill"], "input_len": s["prefill"][0],
         "output_len": s["prefill"][1]},
    ]  # fmt: skip
    step = {"engine": engine(s, mode), "batches": [1], "context": s["context"],
            "steps": s["steps"], "prefill_tokens": 8192, "modes": s["modes"],
            "copy_mib": 16 if s["device"] == "cpu" else 2048}  # fmt: skip
    return [("offline", {"engine": engine(s, mode), "workloads": workloads}),
            ("decode_step", step)]  # fmt: skip


def run_worker(kind: str, args: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(WORKERS), kind, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=max(timeout, 1))  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} exited {proc.returncode}: {proc.stderr[-400:]}")


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(data: dict) -> str:
    """One row per format: out tok/s of both workloads, the b1 step, vs bf16, vs TRT-LLM."""
    s, res = data["sizes"], data["results"]
    mode_key = f"{s['modes'][-1]}/b1"
    bf16 = (res.get("bf16", {}).get("offline") or {}).get("decode_heavy", {})
    lines = [
        f"Quantized weights, {s['config']} dummy, {s['device']}"
        + (" (CPU dry run)" if data["dry_run"] else ""),
        "",
        "| format | decode-heavy {}/{} out tok/s | prefill-heavy {}/{} out tok/s | "
        "batch-1 step ms | decode vs bf16 | TRT-LLM FP8 H200 (decode, prefill) |".format(
            *s["decode"], *s["prefill"]
        ),
        "|---|---|---|---|---|---|",
    ]
    trt = "{decode_heavy}, {prefill_heavy} tok/s".format(**TRTLLM_H200_FP8)
    for mode in MODES:
        r = res.get(mode, {})
        if "error" in r:
            lines.append(f"| {mode} | error: {r['error'][:120]} | | | | |")
            continue
        off = r.get("offline") or {}
        dec = (off.get("decode_heavy") or {}).get("output_tok_per_s")
        pre = (off.get("prefill_heavy") or {}).get("output_tok_per_s")
        b1 = ((r.get("decode_step") or {}).get(mode_key) or {}).get("ms_per_step")
        ratio = dec / bf16["output_tok_per_s"] if dec and bf16.get("output_tok_per_s") else None
        lines.append(f"| {mode} | {_f(dec, '.0f')} | {_f(pre, '.0f')} | {_f(b1, '.2f')} | "
                     f"{_f(ratio, '.2f')}x | {trt if mode == 'fp8' else ''} |")  # fmt: skip
    lines += ["", f"Target: FP8 decode-heavy >= {FP8_DECODE_TARGET}x bf16 ({fp8_verdict(data)})."]
    return "\n".join(lines) + "\n"


def fp8_verdict(data: dict) -> str:
    try:
        get = lambda m: data["results"][m]["offline"]["decode_heavy"]["output_tok_per_s"]  # noqa: E731
        ratio = get("fp8") / get("bf16")
    except (KeyError, TypeError, ZeroDivisionError):
        return "not measured"
    return f"{ratio:.2f}x, {'met' if ratio >= FP8_DECODE_TARGET else 'not met'}"


def write(outdir: Path, data: dict) -> None:
    (outdir / "quantized.json").write_text(json.dumps(data, indent=2))
    (outdir / "quantized.md").write_text(table(data))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--budget-s", type=float, default=360.0)
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU")
    args = p.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    s = sizes(args.dry_run)
    data = {"dry_run": args.dry_run, "sizes": s, "results": {}}
    t0 = time.monotonic()
    for mode in MODES:
        data["results"][mode] = result = {}
        for kind, call in worker_calls(s, mode):
            left = args.budget_s - (time.monotonic() - t0)
            try:
                if left < 5:
                    raise TimeoutError("budget spent")
                result[kind] = run_worker(kind, call, left)
            except Exception as e:  # NOTE: a failed measurement is a row, not the end
                result[kind] = {"error": f"{type(e).__name__}: {e}"[:300]}
            write(args.outdir, data)
    print(table(data))
    return data


if __name__ == "__main__":
    main()
