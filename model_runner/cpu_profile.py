"""What this CPU computes fastest, decided once per CPU model and kept on disk.

`--dtype auto` on the CPU takes bfloat16 activations only where the CPU computes bf16
natively *and* is faster at it: a CPU without bf16 instructions gets float32 without a
measurement; one with AMX gets bfloat16; one with only AVX-512 BF16 (AMD Zen 4, Intel
Cooper Lake and later) is measured, since some of those ran bf16 GEMMs slower than fp32.
The same kind of short measurement (~1 s) finds how many rows a quantized GEMM (torch's
int4, or the int8-dot kernels' q4 and q8) stays ahead of a dense bf16 one
(`quantized_max_rows`), for the quantized methods' per-step choice.

The result is cached as JSON under `$TOKENMILL_CACHE_DIR` (default ~/.cache/tokenmill)
`/cpu/<key>.json`, keyed by the CPU model name, its bf16 flags, the torch version and thread
count, so the choice does not flip between restarts on a noisy machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from kernels.cpu_info import cpu_info
from model_runner.config import cache_dir

log = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm BF16
BF16_WIN = 0.85  # bf16 must take at most this share of fp32's time to be picked
PROFILE_VERSION = 1


@dataclass(frozen=True)
class CpuProfile:
    """The dtype decision and what it rests on."""

    cpu: str
    flags: tuple[str, ...]  # the BF16_FLAGS this CPU has
    dtype: str  # bfloat16 | float32: what --dtype auto takes
    reason: str
    timings_ms: dict[str, float]


def cpu_name_and_flags() -> tuple[str, tuple[str, ...]]:
    """The CPU model name and which BF16_FLAGS it reports."""
    name, flags = cpu_info()
    return name, tuple(f for f in BF16_FLAGS if f in flags)


class ProfileCache:
    """The JSON file of one CPU model: {"version", "dtype": CpuProfile, "int4_max_rows": {}}."""

    def __init__(self, cpu: str, flags: tuple[str, ...]):
        key = f"{cpu}|{','.join(flags)}|{torch.__version__}|{torch.get_num_threads()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.path = cache_dir() / "cpu" / f"{digest}.json"

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("version") == PROFILE_VERSION else {}

    def update(self, **entries) -> None:
        data = {**self.read(), **entries, "version": PROFILE_VERSION}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)  # NOTE: atomic, so concurrent first starts are safe
        except OSError as e:
            log.warning("could not cache the CPU profile at %s: %s", self.path, e)


def cpu_profile() -> CpuProfile:
    """This CPU's dtype decision: from the cache, else decided (measured if need be) and saved."""
    cpu, flags = cpu_name_and_flags()
    cache = ProfileCache(cpu, flags)
    try:
        data = dict(cache.read()["dtype"])
        data["flags"] = tuple(data["flags"])
        return CpuProfile(**data)
    except (KeyError, TypeError, ValueError):
        pass
    profile = decide(cpu, flags)
    cache.update(dtype=asdict(profile))
    return profile


def decide(cpu: str, flags: tuple[str, ...]) -> CpuProfile:
    """Flags where they settle it, else a measurement (see the module)."""
    if not flags:
        return CpuProfile(cpu, flags, "float32", "no native bf16 instructions", {})
    if "amx_bf16" in flags:
        return CpuProfile(cpu, flags, "bfloat16", "AMX computes bf16 natively", {})
    timings = measure_dtypes()
    bf16 = sum(timings[f"bf16@{m}"] for m in DTYPE_ROWS)
    fp32 = sum(timings[f"fp32@{m}"] for m in DTYPE_ROWS)
    share = f"bf16 GEMMs took {bf16 / fp32:.0%} of fp32's time"
    if bf16 <= BF16_WIN * fp32:
        return CpuProfile(cpu, flags, "bfloat16", f"native bf16, {share}", timings)
    return CpuProfile(cpu, flags, "float32", f"native bf16 but {share}", timings)


def quantized_max_rows(shapes: list[tuple[int, int]], layout: str) -> int:
    """Rows up to which the quantized GEMM of `layout` (q4, q8: the int8-dot kernels; int4:
    torch's) beats dense bf16 for `shapes`. Measured once per CPU model, layout and set of
    shapes, then read from the cache."""
    cpu, flags = cpu_name_and_flags()
    cache = ProfileCache(cpu, flags)
    if layout in ("q4", "q8"):
        from kernels.int8_dot_linear import build_id

        layout_key = f"{layout}@{build_id()}"  # NOTE: a changed kernel is measured again
    else:
        layout_key = layout
    key = f"{layout_key}:" + ";".join(f"{o}x{i}" for o, i in shapes)
    known = cache.read().get("int4_max_rows", {})
    if isinstance(known.get(key), int):
        return known[key]
    rows = crossover(measure_quantized(shapes, layout))
    cache.update(int4_max_rows={**known, key: rows})
    return rows


# --- the measurements -------------------------------------------------------------------

DTYPE_ROWS = (1, 8, 32)  # decode-step row counts the dtype choice weighs equally
INT4_ROWS = (1, 2, 4, 8, 16, 32)
NUM_WEIGHTS, OUT, IN = 12, 2048, 1024  # 48 MiB of bf16 weights: more than a typical L3
STREAM_BYTES = 48 * 2**20  # int4 measurement: enough copies of the shapes to stream this


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _dense_layouts(weights: list[torch.Tensor]) -> list[tuple[torch.Tensor, object]]:
    from kernels.linear import pack_linear_weight, packing_available

    packs = packing_available(weights[0].dtype)
    return [(w, pack_linear_weight(w, 32) if packs else None) for w in weights]


def _inputs(rows: int, widths, dtype: torch.dtype, gen: torch.Generator) -> dict:
    return {k: torch.randn(rows, k, generator=gen).to(dtype) for k in set(widths)}


def _time_dense(layouts, rows: int, gen: torch.Generator) -> float:
    from kernels.linear import linear

    xs = _inputs(rows, [w.shape[1] for w, _ in layouts], layouts[0][0].dtype, gen)
    return _median_ms(lambda: [linear(xs[w.shape[1]], w, None, p) for w, p in layouts])


@torch.inference_mode()
def measure_dtypes() -> dict[str, float]:
    """Milliseconds for NUM_WEIGHTS distinct [OUT x IN] products in fp32 and bf16, by rows."""
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(OUT, IN, generator=gen) * 0.02 for _ in range(NUM_WEIGHTS)]
    timings = {}
    for kind, weights in (("fp32", fp32), ("bf16", [w.bfloat16() for w in fp32])):
        layouts = _dense_layouts(weights)
        for m in DTYPE_ROWS:
            timings[f"{kind}@{m}"] = _time_dense(layouts, m, gen)
    return timings


def _quantized_weights(shapes, layout: str, gen: torch.Generator) -> list[tuple]:
    """Random weights of `shapes` in `layout`, as (packed, scales) pairs."""
    from kernels import int8_dot_linear
    from kernels.quant_linear import int4_pack
    from model_runner.quant.int4_weights import GROUP_SIZE

    def one(o: int, i: int) -> tuple:
        d = torch.rand(o, i // GROUP_SIZE, generator=gen) / 64
        if layout == "q4":
            return int8_dot_linear.pack_q4(torch.randint(0, 16, (o, i), generator=gen), d, -8 * d)
        if layout == "q8":
            return int8_dot_linear.pack_q8(torch.randint(-128, 128, (o, i), generator=gen), d)
        return int4_pack(torch.randint(0, 16, (o, i), generator=gen)), torch.rand(
            i // GROUP_SIZE, o, 2, generator=gen
        ).bfloat16()

    return [one(o, i) for o, i in shapes]


@torch.inference_mode()
def measure_quantized(shapes: list[tuple[int, int]], layout: str) -> dict[str, float]:
    """Milliseconds for copies of `shapes`, dense bf16 vs `layout` (group 32), by rows."""
    from kernels.quant_linear import int4_kernel_available
    from model_runner.quant.quantized_linear import quantized_matmul

    if layout == "int4" and not int4_kernel_available(torch.device("cpu")):
        return {}
    gen = torch.Generator().manual_seed(0)
    copies = max(1, min(30, -(-STREAM_BYTES // (2 * sum(o * i for o, i in shapes)))))
    shapes = shapes * copies
    dense = _dense_layouts([torch.randn(o, i, generator=gen).bfloat16() for o, i in shapes])
    weights = _quantized_weights(shapes, layout, gen)
    timings = {}
    for m in INT4_ROWS:
        timings[f"bf16@{m}"] = _time_dense(dense, m, gen)
        xs = _inputs(m, [i for _, i in shapes], torch.bfloat16, gen)
        timings[f"int4@{m}"] = _median_ms(
            lambda xs=xs: [
                quantized_matmul(xs[i], layout, *w)
                for (_, i), w in zip(shapes, weights, strict=True)
            ]
        )
    return timings


def crossover(timings: dict[str, float]) -> int:
    """The largest row count up to which the quantized GEMM was faster than dense bf16 at
    each (its timings are under `int4@rows` whatever the layout)."""
    best = 0
    for m in INT4_ROWS:
        if f"int4@{m}" not in timings or timings[f"int4@{m}"] >= timings[f"bf16@{m}"]:
            break
        best = m
    return best
