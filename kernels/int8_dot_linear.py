"""4- and 8-bit weight GEMMs with int8 activations (AVX-512 VNNI), beside their torch references.

torch's CPU int4 GEMM (`kernels.quant_linear`) dequantizes every weight to bf16 and spends
its time on that arithmetic, not on reading memory (~11 GB/s of 4-bit weights on a Zen 4
core pair that reads 55 GB/s). These kernels do what llama.cpp does on the same CPUs:
quantize each activation row per block of 32 inputs to int8 (scale max|x| / 127), take each
block's dot product with the weights as exact integer sums (VPDPBUSD, 64 multiplies per
instruction), and scale it by the two blocks' scales in float32. Unlike llama.cpp, the
rounding error of each activation is kept as a second int8 (x ~= d * (q + lo / 254)), one
more integer sum per block, so activations keep ~15 bits instead of 8:

- q4: 4-bit weights with a scale and a minimum per block of 32 (w = d * q + m, GGUF Q4_1;
  Q4_0 and the int4 mode are the same with m = -8 d or their own zero).
- q8: 8-bit weights with a scale per block (w = d * q, GGUF Q8_0 and the int8 mode).

The weight scales are fp16, as GGUF stores them (exact for GGUF; the int4/int8 modes' bf16
scales convert exactly too, above fp16's subnormal range). The sources (`kernels/csrc/`:
these GEMMs and the decode layer of `kernels.cpu_decode_layer`) are compiled into one library
once per machine with the system's C++ compiler against the installed torch, into the
folder the caller names (the engine's: `$TOKENMILL_CACHE_DIR/kernels`); a CPU without
AVX-512 VNNI, a missing compiler or a failed self-check leaves them unavailable and the
quantized methods on torch's int4 GEMM.

NOTE: quantizing the activations is a rounding of its own (smaller than bf16's at the
block's largest values, larger at its smallest); the references reproduce it exactly, so
kernel and reference agree to float32 rounding.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kernels.cpu_info import cpu_info

log = logging.getLogger(__name__)

BLOCK = 32  # inputs per quantization block (weights and activations)
TILE = 16  # output rows per kernel tile
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "int8_dot_linear.cpp", CSRC / "decode_layer.cpp")  # one library
HEADERS = (CSRC / "int8_dot.h",)
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
COMPILE_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w", "-mavx512f",
                 "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]  # fmt: skip
LIBRARY = "tokenmill_int8_dot"


# --- layouts ------------------------------------------------------------------------------


def _chunks(q: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N / 16, K / 32, 8, 16, 4]: per tile and block, 8 chunks of 16 rows x 4."""
    n, k = q.shape
    return q.view(n // TILE, TILE, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The q4 layout of q [N, K] (values 0..15) with d, m [N, K / 32] (w = d * q + m)."""
    n, k = q.shape
    chunks = _chunks(q.to(torch.uint8)).reshape(n // TILE, k // BLOCK, 4, 2, 64)
    packed = (chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)).contiguous()
    tiles = [t.reshape(n // TILE, TILE, k // BLOCK).permute(0, 2, 1) for t in (d, m)]
    return packed, torch.stack(tiles, dim=2).to(torch.float16).contiguous()


def unpack_q4(packed: torch.Tensor, scales: torch.Tensor):
    """(q [N, K] uint8, d, m [N, K / 32] float32) of a q4 layout."""
    tiles, blocks = packed.shape[:2]
    chunks = torch.stack([packed & 0x0F, packed >> 4], dim=3).view(tiles, blocks, 8, TILE, 4)
    q = chunks.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, blocks * BLOCK)
    d, m = (scales[:, :, i].permute(0, 2, 1).reshape(tiles * TILE, blocks).float() for i in (0, 1))
    return q, d, m


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The q8 layout of q [N, K] (values -128..127) with d [N, K / 32] (w = d * q)."""
    n, k = q.shape
    biased = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = _chunks(biased).reshape(n // TILE, k // BLOCK, 8, 64).contiguous()
    scales = d.reshape(n // TILE, TILE, k // BLOCK).permute(0, 2, 1).to(torch.float16)
    return packed, scales.contiguous()


def unpack_q8(packed: torch.Tensor, scales: torch.Tensor):
    """(q [N, K] int16, d [N, K / 32] float32) of a q8 layout."""
    tiles, blocks = packed.shape[:2]
    chunks = packed.view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)
    q = chunks.reshape(tiles * TILE, blocks * BLOCK).to(torch.int16) - 128
    return q, scales.permute(0, 2, 1).reshape(tiles * TILE, blocks).float()


def fits(out_features: int, in_features: int) -> bool:
    """Whether a [out, in] weight has the kernels' shape (whole tiles and blocks)."""
    return out_features % TILE == 0 and in_features % BLOCK == 0


# --- kernels and references ---------------------------------------------------------------


def q4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
              float_out: bool = False) -> torch.Tensor:  # fmt: skip
    """x [M, K] (bf16 or fp32) @ w.T for a q4 weight: [M, N] in x's dtype, or float32."""
    return torch.ops.tokenmill_int8_dot.q4_linear(x.contiguous(), packed, scales, float_out)


def q8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
              float_out: bool = False) -> torch.Tensor:  # fmt: skip
    """x [M, K] (bf16 or fp32) @ w.T for a q8 weight: [M, N] in x's dtype, or float32."""
    return torch.ops.tokenmill_int8_dot.q8_linear(x.contiguous(), packed, scales, float_out)


LOW_SCALE = 254  # the rounding error's steps: x ~= d * (q + lo / LOW_SCALE)


def quantize_activations(x: torch.Tensor):
    """The kernels' activations (q + lo / LOW_SCALE [M, K / 32, 32], d [M, K / 32]): q and
    lo int8, as float64, so that x ~= d * (q + lo / LOW_SCALE) per block of 32."""
    xf = x.float().view(x.shape[0], -1, BLOCK)
    d = xf.abs().amax(dim=-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    scaled = xf * inv[..., None]
    q = torch.round(scaled)
    lo = torch.round((scaled - q) * LOW_SCALE)
    return q.double() + lo.double() / LOW_SCALE, d


def _block_products(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum over blocks of dx * dw * (exact integer dot): [M, N] float64."""
    qx, dx = quantize_activations(x)
    dots = torch.einsum("mbi,nbi->mnb", qx, q.double().view(q.shape[0], -1, BLOCK))
    return (dots * (dx.double()[:, None] * d.double()[None])).sum(-1)


def _out(result: torch.Tensor, x: torch.Tensor, float_out: bool) -> torch.Tensor:
    return result.float() if float_out or x.dtype == torch.float32 else result.to(x.dtype)


def q4_linear_ref(x, packed, scales, float_out: bool = False) -> torch.Tensor:
    """Torch reference of `q4_linear` (the zero term from the unquantized block sums)."""
    q, d, m = unpack_q4(packed, scales)
    sums = x.float().view(x.shape[0], -1, BLOCK).sum(-1).double()
    return _out(_block_products(x, q, d) + sums @ m.double().t(), x, float_out)


def q8_linear_ref(x, packed, scales, float_out: bool = False) -> torch.Tensor:
    """Torch reference of `q8_linear`."""
    q, d = unpack_q8(packed, scales)
    return _out(_block_products(x, q, d), x, float_out)


# --- build and load -----------------------------------------------------------------------


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")


def _command(compiler: str, output: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, *COMPILE_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{root / 'include'}", f"-I{root / 'include/torch/csrc/api/include'}",
            *map(str, SOURCES), "-o", str(output), f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{root / 'lib'}"]  # fmt: skip


@functools.cache
def build_id() -> str:
    """A digest of the sources, torch and the flags: names the build (and its timings)."""
    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = "|".join([*texts, torch.__version__, *COMPILE_FLAGS])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _build(compiler: str, folder: Path) -> Path:
    """The compiled library in `folder`, from there or compiled now (once per build)."""
    digest = hashlib.sha256(f"{build_id()}|{compiler}".encode()).hexdigest()[:20]
    path = folder / f"int8_dot_linear-{digest}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # NOTE: concurrent first starts compile once
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".so")
            os.close(fd)
            log.info("compiling the int8-dot CPU kernels (once per machine)")
            done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True)
            if done.returncode:
                os.unlink(tmp)
                raise RuntimeError(done.stderr.strip().splitlines()[-1:] or "compiler failed")
            os.replace(tmp, path)
    return path


def _register_fakes() -> None:
    """Shapes for torch.compile (the compiled decode layer calls the kernels)."""

    def fake(x, packed, scales, float_out):
        dtype = torch.float32 if float_out else x.dtype
        return x.new_empty((x.shape[0], packed.shape[0] * TILE), dtype=dtype)

    for name in ("q4_linear", "q8_linear"):
        torch.library.register_fake(f"{LIBRARY}::{name}")(fake)


def _self_check() -> bool:
    """The kernels against their references on random weights (a bad build is not used)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 48, 96
    x = torch.randn(3, k, generator=gen)
    q4 = pack_q4(torch.randint(0, 16, (n, k), generator=gen),
                 torch.rand(n, k // BLOCK, generator=gen) / 8,
                 -torch.rand(n, k // BLOCK, generator=gen))  # fmt: skip
    q8 = pack_q8(torch.randint(-128, 128, (n, k), generator=gen),
                 torch.rand(n, k // BLOCK, generator=gen) / 64)  # fmt: skip
    pairs = [(q4_linear, q4_linear_ref, q4), (q8_linear, q8_linear_ref, q8)]
    return all(
        torch.allclose(kernel(x, *w, True), ref(x, *w, True), rtol=1e-4, atol=1e-4)
        for kernel, ref, w in pairs
    )


_available: bool | None = None  # the first call's answer (the ops register once a process)


def available(build_dir: Path) -> bool:
    """Whether the kernels run here: the CPU, a compiler, a good build (see the module),
    built in or loaded from `build_dir` by the first call of the process."""
    global _available
    if _available is None:
        _available = _load(Path(build_dir))
    return _available


def _load(build_dir: Path) -> bool:
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_info()[1]]
    if missing:
        log.info("int8-dot CPU kernels off: the CPU lacks %s", ", ".join(missing))
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("int8-dot CPU kernels off: no C++ compiler (g++) found")
        return False
    try:
        torch.ops.load_library(str(_build(compiler, build_dir)))
        _register_fakes()
        if not _self_check():
            log.warning("int8-dot CPU kernels off: they disagree with their references here")
            return False
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("int8-dot CPU kernels off: %s", e)
        return False
    return True
