"""What this CPU computes fastest, decided once per CPU model and kept on disk.

`--dtype auto` on the CPU takes bfloat16 activations only where the CPU computes bf16
natively *and* is faster at it: a CPU without bf16 instructions gets float32 without a
measurement; one with AMX gets bfloat16; one with only AVX-512 BF16 (AMD Zen 4, Intel
Cooper Lake and later) is measured, since some of those ran bf16 GEMMs slower than fp32.
The same short measurement (~1 s) finds how many rows the 4-bit GEMM stays ahead of a
dense bf16 one (`int4_max_rows`), for the quantized methods' per-step choice.

The result is cached as JSON under `$TOKENMILL_CACHE_DIR` (default ~/.cache/tokenmill)
`/cpu/<key>.json`, keyed by the CPU model name, its bf16 flags, the torch version and thread
count, so the choice does not flip between restarts on a noisy machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

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


@functools.cache  # NOTE: both decisions of a start read /proc/cpuinfo once
def cpu_name_and_flags() -> tuple[str, tuple[str, ...]]:
    """The CPU model name and which BF16_FLAGS it reports (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name":
                    name = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
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


def int4_max_rows(shapes: list[tuple[int, int]]) -> int:
    """Rows up to which the 4-bit GEMM beats dense bf16 for a model's projection `shapes`.

    Measured once per CPU model and set of shapes, then read from the cache.
    """
    cpu, flags = cpu_name_and_flags()
    cache = ProfileCache(cpu, flags)
    key = ";".join(f"{o}x{i}" for o, i in shapes)
    known = cache.read().get("int4_max_rows", {})
    if isinstance(known.get(key), int):
        return known[key]
    rows = crossover(measure_int4(shapes))
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


@torch.inference_mode()
def measure_int4(shapes: list[tuple[int, int]]) -> dict[str, float]:
    """Milliseconds for copies of `shapes` (bf16 dense vs 4-bit, group 32), by rows."""
    from kernels.quant_linear import int4_kernel_available, int4_linear, int4_pack
    from model_runner.quant.int4_weights import GROUP_SIZE

    if not int4_kernel_available(torch.device("cpu")):
        return {}
    gen = torch.Generator().manual_seed(0)
    copies = max(1, min(30, -(-STREAM_BYTES // (2 * sum(o * i for o, i in shapes)))))
    shapes = shapes * copies
    dense = _dense_layouts([torch.randn(o, i, generator=gen).bfloat16() for o, i in shapes])
    q4 = [
        (
            int4_pack(torch.randint(0, 16, (o, i), generator=gen)),
            torch.rand(i // GROUP_SIZE, o, 2).bfloat16(),
        )
        for o, i in shapes
    ]
    timings = {}
    for m in INT4_ROWS:
        timings[f"bf16@{m}"] = _time_dense(dense, m, gen)
        xs = _inputs(m, [i for _, i in shapes], torch.bfloat16, gen)
        timings[f"int4@{m}"] = _median_ms(
            lambda xs=xs: [
                int4_linear(xs[sz.shape[0] * GROUP_SIZE], p, sz, GROUP_SIZE) for p, sz in q4
            ]
        )
    return timings


def crossover(timings: dict[str, float]) -> int:
    """The largest row count up to which the int4 GEMM was faster than dense bf16 at each."""
    best = 0
    for m in INT4_ROWS:
        if f"int4@{m}" not in timings or timings[f"int4@{m}"] >= timings[f"bf16@{m}"]:
            break
        best = m
    return best
