"""The GPU suite's driver (`load_tests/gpu_suite.sh` runs it): every step of issue 14's table,
saved as JSON and Markdown under OUTDIR after each step, stopping itself at --budget-s.

    python load_tests/gpu_bench.py OUTDIR [--budget-s 480] [--dry-run]

Steps that own the device run in `gpu_workers.py` subprocesses; serving runs a real
`tokenmill serve --skip-tokenizer-init` and sends token-id prompts at Poisson rates.
`--dry-run`: the same steps on the tiny config on the CPU, tiny sizes, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import write_report  # noqa: E402
from gpu_serving import serve_and_measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "gpu_workers.py"
GPU_TEST_FILES = [
    "tests/kernels/test_gpu.py",
    "tests/model_runner/test_step_timer.py",
    "tests/model_runner/test_grammar.py",
]


def sizes(dry: bool) -> dict:
    """Every shape of the suite; the real ones sized so that all of it fits 8 min on an H200."""
    if dry:
        return {
            "config": "tiny-llama",
            "device": "cpu",
            "dtype": "float32",
            "n": 6,
            "decode": (24, 8),
            "prefill": (24, 2),
            "sharegpt": (12, 8),
            "context": 32,
            "batches": [1, 4],
            "steps": 3,
            "rates": [4.0, 16.0],
            "serve_n": 4,
            "serve_out": 4,
            "hf_batch": 2,
            "hf_b1_out": 4,
            "copy_mib": 16,
            "kv_gib": 0.05,
            "modes": ["eager"],
        }
    return {
        "config": "llama-3.1-8b",
        "device": "cuda",
        "dtype": "bfloat16",
        "n": 500,
        "decode": (462, 256),
        "prefill": (462, 16),
        "sharegpt": (202, 179),
        "context": 1024,
        "batches": [1, 64, 256],
        "steps": 20,
        "rates": [2.0, 8.0, 32.0],
        "serve_n": 64,
        "serve_out": 64,
        "hf_batch": 64,
        "hf_b1_out": 32,
        "copy_mib": 2048,
        "kv_gib": 40.0,
        "modes": ["eager", "graphs"],
    }


def engine_kwargs(s: dict, **extra) -> dict:
    return {
        "load_format": "dummy",
        "hf_config_path": s["config"],
        "device": s["device"],
        "dtype": s["dtype"],
        "skip_tokenizer_init": True,
        **extra,
    }


def sharegpt_lens(n: int, mean_in: int, mean_out: int) -> tuple[list[int], list[int]]:
    """Synthetic ShareGPT-like lengths: a fixed, skewed spread around the published means."""
    shape = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # mean 1.0
    ins = [max(4, round(mean_in * shape[i % 7])) for i in range(n)]
    outs = [max(2, round(mean_out * shape[(i * 3 + 1) % 7])) for i in range(n)]
    return ins, outs


class Suite:
    def __init__(self, outdir: Path, budget_s: float, dry: bool) -> None:
        self.outdir, self.budget_s, self.dry = outdir, budget_s, dry
        self.s = sizes(dry)
        self.t0 = time.monotonic()
        self.data = {"dry_run": dry, "budget_s": budget_s, "sizes": self.s, "steps": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, fn) -> None:
        """One step: skipped past the budget; its result or error saved at once."""
        if self.left() < 5:
            self.data["steps"][name] = {"skipped": "budget"}
        else:
            t0 = time.monotonic()
            try:
                result = fn()
            except Exception as e:  # NOTE: a failed step is a row, never the end of the suite
                result = {"error": f"{type(e).__name__}: {e}"[:500]}
            result["step_seconds"] = round(time.monotonic() - t0, 2)
            self.data["steps"][name] = result
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        write_report(self.outdir, self.data)

    def worker(self, kind: str, args: dict) -> dict:
        proc = subprocess.run(
            [sys.executable, str(WORKERS), kind, json.dumps(args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=max(self.left(), 1),
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"{kind} exited {proc.returncode}: {proc.stderr[-400:]}")

    def pytest_gpu(self) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            *GPU_TEST_FILES,
        ]
        if self.dry:  # NOTE: no GPU: only that every GPU test imports and collects here
            cmd.append("--collect-only")
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=max(min(self.left() * 0.4, 150), 1),
        )
        tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-200:]]
        return {"returncode": proc.returncode, "summary": tail[0]}

    def offline(self) -> dict:
        s = self.s
        ins, outs = sharegpt_lens(s["n"], *s["sharegpt"])
        workloads = [
            {
                "name": "decode_heavy",
                "n": s["n"],
                "input_len": s["decode"][0],
                "output_len": s["decode"][1],
            },
            {
                "name": "prefill_heavy",
                "n": s["n"],
                "input_len": s["prefill"][0],
                "output_len": s["prefill"][1],
            },
            {"name": "sharegpt", "n": s["n"], "input_lens": ins, "output_lens": outs},
        ]
        extra = {"kv_cache_memory": s["kv_gib"]} if self.dry else {}
        args = {
            "engine": engine_kwargs(
                s, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048, **extra
            ),
            "workloads": workloads,
        }
        return self.worker("offline", args)

    def decode_step(self) -> dict:
        s = self.s
        engine = engine_kwargs(
            s,
            kv_cache_memory=s["kv_gib"],
            max_num_seqs=max(s["batches"]),
            max_num_batched_tokens=8192,
            max_model_len=2048,
        )
        return self.worker(
            "decode_step",
            {
                "engine": engine,
                "batches": s["batches"],
                "context": s["context"],
                "steps": s["steps"],
                "prefill_tokens": 8192,
                "modes": s["modes"],
                "copy_mib": s["copy_mib"],
            },
        )

    def hf(self) -> dict:
        from model_runner.model_source import resolve_hf_config_path

        s = self.s
        b = s["hf_batch"]
        return self.worker(
            "hf",
            {
                "device": s["device"],
                "dtype": s["dtype"],
                "config_dir": str(resolve_hf_config_path(s["config"]).parent),
                "workloads": [
                    {
                        "name": "decode_heavy",
                        "batch": b,
                        "input_len": s["decode"][0],
                        "output_len": s["decode"][1],
                    },
                    {
                        "name": "prefill_heavy",
                        "batch": b,
                        "input_len": s["prefill"][0],
                        "output_len": s["prefill"][1],
                    },
                    {
                        "name": "decode_b1",
                        "batch": 1,
                        "input_len": s["context"],
                        "output_len": s["hf_b1_out"],
                    },
                ],
            },
        )

    def serving(self) -> dict:
        s = self.s
        flags = [
            "--load-format",
            "dummy",
            "--hf-config-path",
            s["config"],
            "--device",
            s["device"],
            "--dtype",
            s["dtype"],
            "--skip-tokenizer-init",
            "--max-model-len",
            "2048",
            "--disable-log-stats",
        ]
        if self.dry:
            flags += ["--kv-cache-memory", str(s["kv_gib"]), "--enforce-eager"]
        return serve_and_measure(
            flags,
            s["rates"],
            s["serve_n"],
            s["decode"][0],
            s["serve_out"],
            timeout=max(self.left(), 5),
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU, seconds")
    p.add_argument("--steps", default=None, help="comma-separated subset of the steps")
    args = p.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    suite = Suite(args.outdir, args.budget_s, args.dry_run)
    steps = {
        "pytest_gpu": suite.pytest_gpu,
        "offline": suite.offline,
        "decode_step": suite.decode_step,
        "serving": suite.serving,
        "hf": suite.hf,
    }
    chosen = args.steps.split(",") if args.steps else list(steps)
    for name in chosen:
        suite.run(name, steps[name])
    return suite.data


if __name__ == "__main__":
    main()
