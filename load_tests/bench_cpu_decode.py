"""The CPU fused decode layer and int8-dot LM head: milliseconds per step, by rows and context.

    python load_tests/bench_cpu_decode.py [--rows 1,2,4,8] [--context 20,600] [--reps 40]

Random 4-bit weights in the default model's shapes (read from its GGUF; SmolLM2-135M: 30
layers, hidden 576, 9 heads over 3 KV heads of 64, MLP 1536) through
`kernels.cpu_decode_layer.decode_layer`, and its Q8_0 LM head (49152 x 576) through the
int8-dot `q8_linear`. A step of R rows is one sequence verifying R - 1 proposals (R = 1: a
plain decode step): R rows at consecutive positions from the context length on, sharing one
decode-context row. Cases run interleaved and each reports its best time over `--reps` (the
least disturbed on a noisy machine); the LM head runs right after each case's layers, as in
a step. The attention's share is a context's time minus the smallest context's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import int8_dot_linear as k  # noqa: E402
from kernels.cpu_decode_layer import (  # noqa: E402
    LAYOUT_CODES,
    LayerWeights,
    Shape,
    StepTensors,
    decode_layer,
)
from model_runner.config import cache_dir  # noqa: E402
from model_runner.gguf_loader import model_config_from_gguf, open_gguf  # noqa: E402
from model_runner.linear_plan import projection_shapes  # noqa: E402
from model_runner.model_source import default_gguf_path  # noqa: E402


def q4_weight(out: int, cols: int, gen: torch.Generator):
    d = torch.rand(out, cols // k.BLOCK, generator=gen) / 20
    return k.pack_q4(torch.randint(0, 16, (out, cols), generator=gen), d, -8 * d)


def model_layers(mc, layers: int, gen: torch.Generator) -> list[LayerWeights]:
    return [
        LayerWeights(
            torch.rand(mc.hidden_size, generator=gen) + 0.5,
            torch.rand(mc.hidden_size, generator=gen) + 0.5,
            tuple(q4_weight(o, c, gen) for o, c in projection_shapes(mc)),
            (LAYOUT_CODES["q4"],) * 4,
            None,
        )
        for _ in range(layers)
    ]


def verify_step(rows: int, context: int, head_dim: int, gen: torch.Generator) -> StepTensors:
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    return StepTensors(torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1),
                       torch.arange(context, context + rows), torch.full((rows,), -1),
                       torch.zeros(rows, dtype=torch.long))  # fmt: skip


def run(args) -> dict:
    if not k.available(cache_dir() / "kernels"):
        raise SystemExit("the int8-dot CPU kernels do not run here (see the engine's log)")
    mc = model_config_from_gguf(open_gguf(default_gguf_path()))
    gen = torch.Generator().manual_seed(0)
    layers = model_layers(mc, mc.num_layers if args.layers is None else args.layers, gen)
    hidden_size, kv_heads, head_dim = mc.hidden_size, mc.num_kv_heads, mc.head_dim
    shape = Shape(mc.num_heads, kv_heads, mc.rms_norm_eps, head_dim**-0.5, 0)
    capacity = max(args.context) + max(args.rows)
    k_buf, v_buf = (torch.randn(1, capacity, kv_heads, head_dim).bfloat16() for _ in "kv")
    k_cache, v_cache = (torch.zeros(1, 16, kv_heads, head_dim, dtype=torch.bfloat16) for _ in "kv")
    d = torch.rand(mc.vocab_size, hidden_size // k.BLOCK, generator=gen) / 320
    head = k.pack_q8(torch.randint(-128, 128, (mc.vocab_size, hidden_size), generator=gen), d)
    cases = {(r, c): verify_step(r, c, head_dim, gen) for r in args.rows for c in args.context}
    hidden = {r: torch.randn(r, hidden_size, generator=gen).bfloat16() for r in args.rows}
    best = {key: float("inf") for key in cases}
    best_head = {r: float("inf") for r in args.rows}
    for _ in range(args.reps):
        for (rows, context), step in cases.items():
            residual = torch.randn(rows, hidden_size, generator=gen)
            start = time.perf_counter()
            for weights in layers:
                decode_layer(residual, weights, step, k_buf, v_buf, k_cache, v_cache, shape)
            best[rows, context] = min(best[rows, context], time.perf_counter() - start)
            # NOTE: right after the layers, as in a step: their weights have pushed the
            # head's out of the cache (timed alone and again, it runs from L3, ~1.5x faster)
            start = time.perf_counter()
            torch.ops.tokenmill_int8_dot.q8_linear(hidden[rows], *head, True)
            best_head[rows] = min(best_head[rows], time.perf_counter() - start)
    return {
        "layers": len(layers),
        "threads": torch.get_num_threads(),
        "layers_ms": {f"rows={r} context={c}": 1e3 * t for (r, c), t in best.items()},
        "lm_head_ms": {f"rows={r}": 1e3 * t for r, t in best_head.items()},
    }


def print_table(result: dict, args) -> None:
    low = min(args.context)
    print(f"{result['layers']} layers, {result['threads']} threads; best of {args.reps}, ms")
    # NOTE: attention's share needs two contexts (a context's time minus the smallest's)
    share = len(args.context) > 1
    head = f"  attention at ctx {max(args.context)}" if share else ""
    print(f"{'rows':>4} " + " ".join(f"{'ctx ' + str(c):>9}" for c in args.context)
          + f" {'LM head':>8}{head}")  # fmt: skip
    layers = result["layers_ms"]
    for r in args.rows:
        times = [layers[f"rows={r} context={c}"] for c in args.context]
        attention = f"  {times[-1] - layers[f'rows={r} context={low}']:.2f}" if share else ""
        print(f"{r:>4} " + " ".join(f"{t:>9.2f}" for t in times)
              + f" {result['lm_head_ms'][f'rows={r}']:>8.2f}{attention}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--context", default="20,300,600",
                   type=lambda s: sorted(int(x) for x in s.split(",")))  # fmt: skip
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--layers", type=int, default=None, help="default: the model's")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
