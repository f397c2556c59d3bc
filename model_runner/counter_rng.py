"""Counter-based uniforms on the device: a row's numbers are a hash of (key, draw index).

No generator state: a seeded request's k-th uniform for output token i is a pure function
of (seed, i, k), so its tokens depend neither on the rest of the batch nor on preemption,
and a whole batch's numbers are a few elementwise int64 ops (graph-capturable, no per-row
launches). The mixer is SplitMix64's finalizer; int64 products wrap mod 2^64 as uint64
ones do, and logical shifts are arithmetic shifts with the sign bits masked off.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as `value` mod 2^64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _finalize(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _srl(z, 30)) * _signed(_MUL1)
    z = (z ^ _srl(z, 27)) * _signed(_MUL2)
    return z ^ _srl(z, 31)


def token_seed(seed: int, index: int) -> int:
    """The 63-bit key of output token `index` of a request seeded with `seed` (host)."""
    z = (seed * _GOLDEN + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return (z ^ (z >> 31)) >> 1


def token_keys(seeds: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`token_seed` of int64 tensors [R] (seeds as their low 64 bits, `signed_seed`)."""
    return _srl(_finalize(seeds * _signed(_GOLDEN) + indices + 1), 1)


def signed_seed(seed: int) -> int:
    """A request seed as the int64 `token_keys` takes."""
    return _signed(seed)


def uniforms(keys: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1), 24 bits each: draw `draws[r]` of row key `keys[r]`."""
    z = _finalize(keys + draws * _signed(_GOLDEN) + 1)
    return _srl(z, 40).to(torch.float32) * (1.0 / (1 << 24))


class RowUniforms:
    """Fresh uniforms per row on every call: each row counts its own draws (on the device)."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys  # [R] int64
        self.draws = torch.zeros_like(keys)

    def __call__(self, rows: list[int] | None = None) -> torch.Tensor:
        """One uniform for each listed row (None: every row), then their counters advance."""
        if rows is None:
            values = uniforms(self.keys, self.draws)
            self.draws += 1
            return values
        index = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        values = uniforms(self.keys[index], self.draws[index])
        self.draws.index_add_(0, index, torch.ones_like(index))
        return values
