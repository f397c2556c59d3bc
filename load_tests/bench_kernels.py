"""Kernel micro-benchmarks on a CUDA GPU, against ceilings measured in the same run.

    python load_tests/bench_kernels.py [--only decode,prefill] [--reps 100] [--json out.json]

Each kernel is timed with CUDA events, one pair per call, after warm-up, with L2 flushed
before every call (which also hides the host launch gap); the median is reported. Inputs are
larger than L2. The ceilings are a device-to-device copy (bytes read + written per second)
and a bf16 matmul (FLOP/s); the Llama-3-8B shapes and targets are those of issue 3:
decode attention (batch 64, context 2048) >= 80% of copy bandwidth, prefill attention
(8 x 1024) >= 60% of torch SDPA (flash backend) FLOP/s on the same un-paged shapes,
norm / rotary / SiLU-mul / KV write >= 80% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336
BLOCK_SIZE = 16
L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Result:
    name: str
    ms: float
    achieved: float  # GB/s or TFLOP/s
    unit: str
    ceiling: float
    target_pct: float | None

    @property
    def pct(self) -> float:
        return 100.0 * self.achieved / self.ceiling


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of one call, CUDA events around each call, L2 flushed before it."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth(args) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), args.warmup, args.reps)
    return 2 * src.numel() / ms / 1e6


def matmul_tflops(args) -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b, args.warmup, args.reps)
    return 2 * n**3 / ms / 1e9


def paged_inputs(seq_lens: list[int], query_lens: list[int], dtype: torch.dtype):
    """Q for the new tokens and a paged K/V cache holding every sequence (random blocks)."""
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    perm = torch.randperm(sum(blocks), device="cuda").int()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[start : start + n]
        start += n
    shape = (sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        query=torch.randn(sum(query_lens), HEADS, HEAD_DIM, dtype=dtype, device="cuda"),
        key_cache=torch.randn(shape, dtype=dtype, device="cuda"),
        value_cache=torch.randn(shape, dtype=dtype, device="cuda"),
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        query_start_loc=qsl.cuda(),
    )


def bench_decode(args, name: str, batch: int, ctx: int, bw: float, target) -> Result:
    from kernels.paged_attention_triton import paged_attention_triton

    dtype = args.dtype
    inp = paged_inputs([ctx] * batch, [1] * batch, dtype)
    q = inp.pop("query")

    def run():
        return paged_attention_triton(
            q, *inp.values(), HEAD_DIM**-0.5, max_query_len=1, max_seq_len=ctx
        )

    ms = time_ms(run, args.warmup, args.reps)
    size = dtype.itemsize
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * size
    total = kv_bytes + 2 * q.numel() * size
    return Result(name, ms, total / ms / 1e6, "GB/s", bw, target)


def _causal_flops(lens: list[int]) -> float:
    return sum(4 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lens)


def bench_prefill(args, batch: int, length: int) -> list[Result]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.paged_attention_triton import paged_attention_triton

    dtype = args.dtype
    flops = _causal_flops([length] * batch)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, dtype=dtype, device="cuda")
    k = torch.randn(batch, HEADS, length, HEAD_DIM, dtype=dtype, device="cuda")
    v = torch.randn_like(k)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    sdpa_ms = time_ms(sdpa, args.warmup, args.reps)
    sdpa_tflops = flops / sdpa_ms / 1e9
    inp = paged_inputs([length] * batch, [length] * batch, dtype)
    query = inp.pop("query")

    def ours():
        return paged_attention_triton(
            query, *inp.values(), HEAD_DIM**-0.5, max_query_len=length, max_seq_len=length
        )

    ms = time_ms(ours, args.warmup, args.reps)
    name = f"prefill attention {batch}x{length}"
    return [
        Result(f"{name} (torch SDPA flash)", sdpa_ms, sdpa_tflops, "TFLOP/s", args.mm, None),
        Result(name, ms, flops / ms / 1e9, "TFLOP/s", sdpa_tflops, 60.0),
    ]


def bench_elementwise(args, bw: float) -> list[Result]:
    from kernels.activation_triton import silu_and_mul_triton
    from kernels.kv_cache_triton import write_kv_triton
    from kernels.layernorm_triton import fused_add_rms_norm_triton, rms_norm_triton
    from kernels.rotary import build_cos_sin_cache
    from kernels.rotary_triton import rotary_embedding_triton

    dt, n, size = args.dtype, args.tokens, args.dtype.itemsize
    x = torch.randn(n, HIDDEN, dtype=dt, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=dt, device="cuda")
    gate_up = torch.randn(n, 2 * INTERMEDIATE, dtype=dt, device="cuda")
    q = torch.randn(n, HEADS, HEAD_DIM, dtype=dt, device="cuda")
    k = torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dt, device="cuda")
    cos_sin = build_cos_sin_cache(HEAD_DIM, 8192, 500000.0).cuda()
    pos = torch.randint(0, 8192, (n,), device="cuda")
    blocks = 2 * n // BLOCK_SIZE
    k_cache = torch.empty(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dt, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(blocks * BLOCK_SIZE, device="cuda")[:n]
    qk_bytes = (q.numel() + k.numel()) * size * 2 + n * HEAD_DIM * 4
    cases = [
        ("rms_norm", lambda: rms_norm_triton(x, w, 1e-5), 2 * x.numel() * size),
        ("fused_add_rms_norm", lambda: fused_add_rms_norm_triton(x, res, w, 1e-5),
         4 * x.numel() * size),
        ("rotary (neox)", lambda: rotary_embedding_triton(pos, q, k, cos_sin), qk_bytes),
        ("silu_and_mul", lambda: silu_and_mul_triton(gate_up), 1.5 * gate_up.numel() * size),
        ("write_kv", lambda: write_kv_triton(k, k, k_cache, v_cache, slots), 4 * k.numel() * size),
    ]  # fmt: skip
    results = []
    for name, fn, nbytes in cases:
        ms = time_ms(fn, args.warmup, args.reps)
        results.append(Result(f"{name} {n} tokens", ms, nbytes / ms / 1e6, "GB/s", bw, 80.0))
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'kernel':<44}{'ms':>9}{'achieved':>18}{'ceiling':>12}{'%':>7}{'target':>8}")
    for r in results:
        target = f">={r.target_pct:.0f}%" if r.target_pct is not None else ""
        verdict = ("  ok" if r.pct >= r.target_pct else "  MISS") if r.target_pct else ""
        print(f"{r.name:<44}{r.ms:>9.4f}{r.achieved:>11.1f} {r.unit:<7}{r.ceiling:>11.1f}"
              f"{r.pct:>6.1f}%{target:>8}{verdict}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="decode,split,prefill,elementwise",
                        help="comma list of: decode, split, prefill, elementwise")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16384, help="rows of the elementwise ops")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    unknown = args.only - {"decode", "split", "prefill", "elementwise"}
    if unknown:
        parser.error(f"unknown --only entries: {sorted(unknown)}")
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; these benchmarks need one.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}")
    bw = copy_bandwidth(args)
    args.mm = matmul_tflops(args)
    results = [
        Result("ceiling: device-to-device copy 1 GiB", 2**31 / bw / 1e6, bw, "GB/s", bw, None),
        Result(
            "ceiling: bf16 matmul 8192^3",
            2 * 8192**3 / args.mm / 1e9,
            args.mm,
            "TFLOP/s",
            args.mm,
            None,
        ),  # fmt: skip
    ]
    if "decode" in args.only:
        results.append(bench_decode(args, "decode attention b64 ctx2048", 64, 2048, bw, 80.0))
    if "split" in args.only:
        for batch, ctx in ((1, 32768), (4, 8192), (16, 4096)):
            name = f"decode attention b{batch} ctx{ctx} (split-KV)"
            results.append(bench_decode(args, name, batch, ctx, bw, None))
    if "prefill" in args.only:
        results += bench_prefill(args, 8, 1024)
    if "elementwise" in args.only:
        results += bench_elementwise(args, bw)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"pct": r.pct} for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
