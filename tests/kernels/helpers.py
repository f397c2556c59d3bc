"""Shared helpers of the kernel tests: tolerances, random inputs, paged batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative-norm tolerances by dtype (fp32 well under 1e-3, bf16 under 1e-2).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64; NaN anywhere gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = rel_err(got, want)
    assert err < TOLERANCE[dtype], f"relative error {err:.3e} >= {TOLERANCE[dtype]:.0e}"


def randn(*shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values drawn on the CPU from `gen` (never zeros), then moved."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@dataclass
class PagedBatch:
    """A ragged batch already written to a paged cache, as the model runner hands it over."""

    query: torch.Tensor
    key_cache: torch.Tensor  # stale slots are NaN (what a kernel must never read)
    value_cache: torch.Tensor
    clean_key_cache: torch.Tensor  # the same with finite stale slots, for the reference
    clean_value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int


def make_paged_batch(
    query_lens, context_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype, device,
    seed=0, spare_blocks=3,
) -> PagedBatch:  # fmt: skip
    """Random paged batch: sequence i has context_lens[i] cached tokens + query_lens[i] new."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    start = 0
    for i, (n, s) in enumerate(zip(blocks_per_seq, seq_lens, strict=True)):
        tables[i, :n] = perm[start : start + n].int()
        start += n
        slots = tables[i, :n].long()[:, None] * block_size + torch.arange(block_size)
        used.view(-1)[slots.view(-1)[:s]] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_clean = randn(*shape, dtype=dtype, device=device, gen=gen)
    v_clean = randn(*shape, dtype=dtype, device=device, gen=gen)
    stale = (~used).to(device)[:, :, None, None]
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        query=randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=device, gen=gen),
        key_cache=k_clean.masked_fill(stale, float("nan")),
        value_cache=v_clean.masked_fill(stale, float("nan")),
        clean_key_cache=k_clean,
        clean_value_cache=v_clean,
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def assert_rounded_equal(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit-equal, except bf16 in Triton's CPU interpreter, which rounds fp32 -> bf16 toward
    zero (the GPU rounds to nearest even): there, within one bf16 ulp."""
    if dtype == torch.bfloat16 and not got.is_cuda:
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()
        assert rel_err(got, want) < 4e-3
    else:
        assert torch.equal(got, want)
