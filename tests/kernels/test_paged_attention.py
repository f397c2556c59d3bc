"""Triton unified paged attention vs the torch reference, and the reference vs SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_triton import paged_attention_triton
from tests.kernels.helpers import assert_close, make_paged_batch, poison_like, randn, rel_err

# (query_lens, context_lens): mixed prefill/decode, contexts ending mid-block, a sequence of
# length 1 (no context, one query token), a chunk after a long context.
MIXED = ((1, 19, 1, 6, 1), (37, 0, 0, 21, 64))
DECODE = ((1, 1, 1), (40, 17, 96))


def _run(batch, scale, *, out=None, **kwargs):
    out = poison_like(batch.query) if out is None else out
    got = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, scale, max_query_len=batch.max_query_len, out=out, **kwargs,
    )  # fmt: skip
    assert got is out
    return got


def _reference(batch, scale, **kwargs):
    return paged_attention_ref(
        batch.query, batch.clean_key_cache, batch.clean_value_cache, batch.block_tables,
        batch.seq_lens, batch.query_start_loc, scale, **kwargs,
    )  # fmt: skip


def _check(lens, *, heads, kv_heads, head_dim, block_size, dtype, device, seed, **kwargs):
    batch = make_paged_batch(
        *lens, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, device=device, seed=seed,
    )  # fmt: skip
    scale = head_dim**-0.5
    attn_kwargs = {k: kwargs[k] for k in ("sliding_window", "soft_cap") if k in kwargs}
    got = _run(batch, scale, **kwargs)
    assert_close(got, _reference(batch, scale, **attn_kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2), (16, 2)])
def test_mixed_batch_gqa_ratios(dtype, heads, kv_heads, device):
    _check(
        MIXED, heads=heads, kv_heads=kv_heads, head_dim=64, block_size=16, dtype=dtype,
        device=device, seed=heads * 10 + kv_heads,
    )  # fmt: skip


@pytest.mark.parametrize("head_dim,block_size", [(64, 32), (128, 16), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims_and_block_sizes(head_dim, block_size, dtype, device):
    _check(
        MIXED, heads=8, kv_heads=2, head_dim=head_dim, block_size=block_size, dtype=dtype,
        device=device, seed=head_dim + block_size,
    )  # fmt: skip


@pytest.mark.parametrize("num_kv_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode(num_kv_splits, dtype, device):
    _check(
        DECODE, heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=dtype, device=device,
        seed=num_kv_splits, num_kv_splits=num_kv_splits,
    )  # fmt: skip


def test_split_kv_mixed_batch(device):
    _check(
        MIXED, heads=6, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
        device=device, seed=7, num_kv_splits=4,
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype,num_kv_splits", [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1)]
)
@pytest.mark.parametrize(
    "options", [{"sliding_window": 9}, {"soft_cap": 3.0}, {"sliding_window": 20, "soft_cap": 8.0}]
)
def test_sliding_window_and_soft_cap(options, dtype, num_kv_splits, device):
    _check(
        MIXED, heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=dtype, device=device,
        seed=len(options) + num_kv_splits, num_kv_splits=num_kv_splits, **options,
    )  # fmt: skip


def test_automatic_path_without_host_bounds(device):
    """No max_query_len / max_seq_len / num_kv_splits: the kernel derives what it needs."""
    batch = make_paged_batch(
        *DECODE, num_heads=8, num_kv_heads=8, head_dim=64, block_size=16,
        dtype=torch.float32, device=device, seed=3,
    )  # fmt: skip
    got = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, 0.125,
    )  # fmt: skip
    assert_close(got, _reference(batch, 0.125), torch.float32)


def test_strided_query_from_fused_qkv(device):
    """q as a view into a fused qkv projection output (row stride > heads * head_dim)."""
    batch = make_paged_batch(
        *MIXED, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.float32, device=device, seed=11,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(12)
    qkv = randn(batch.query.shape[0], 8 * 64, dtype=torch.float32, device=device, gen=gen)
    batch.query = qkv[:, : 4 * 64].view(-1, 4, 64)
    assert not batch.query.is_contiguous()
    assert_close(_run(batch, 0.125), _reference(batch, 0.125), torch.float32)


def test_bf16_close_to_fp32_truth(device):
    """The bf16 kernel is within bf16 tolerance of fp32 math on the same (rounded) inputs."""
    batch = make_paged_batch(
        *MIXED, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
        dtype=torch.bfloat16, device=device, seed=5,
    )  # fmt: skip
    got = _run(batch, 128**-0.5)
    want = paged_attention_ref(
        batch.query.float(), batch.clean_key_cache.float(), batch.clean_value_cache.float(),
        batch.block_tables, batch.seq_lens, batch.query_start_loc, 128**-0.5,
    )  # fmt: skip
    assert rel_err(got, want) < 1e-2


def _sdpa_per_sequence(q, keys, values, query_lens, seq_lens, scale, group):
    outs, start = [], 0
    for q_len, s_len, k, v in zip(query_lens, seq_lens, keys, values, strict=True):
        qs = q[start : start + q_len].transpose(0, 1)
        k = k.transpose(0, 1).repeat_interleave(group, 0)
        v = v.transpose(0, 1).repeat_interleave(group, 0)
        # Bottom-right causal: query j sits at position s_len - q_len + j.
        mask = torch.ones(q_len, s_len, dtype=torch.bool).tril(diagonal=s_len - q_len)
        outs.append(F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale))
        start += q_len
    return torch.cat([o.transpose(0, 1) for o in outs])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_reference_matches_unpaged_sdpa(heads, kv_heads):
    """The reference is checked against plain SDPA on contiguous, un-paged K/V."""
    gen = torch.Generator().manual_seed(heads)
    query_lens, context_lens = MIXED
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    block_size, head_dim = 16, 32
    keys = [torch.randn(s, kv_heads, head_dim, generator=gen) for s in seq_lens]
    values = [torch.randn(s, kv_heads, head_dim, generator=gen) for s in seq_lens]
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen)
    blocks = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(blocks), generator=gen)
    k_cache = torch.randn(sum(blocks), block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    start = 0
    for i, (n, s) in enumerate(zip(blocks, seq_lens, strict=True)):
        tables[i, :n] = perm[start : start + n].int()
        start += n
        k_cache.view(-1, kv_heads, head_dim)[_slots(tables[i, :n], block_size)[:s]] = keys[i]
        v_cache.view(-1, kv_heads, head_dim)[_slots(tables[i, :n], block_size)[:s]] = values[i]
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    got = paged_attention_ref(
        q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl, 0.2
    )
    want = _sdpa_per_sequence(q, keys, values, query_lens, seq_lens, 0.2, heads // kv_heads)
    assert rel_err(got, want) < 1e-6


def _slots(table: torch.Tensor, block_size: int) -> torch.Tensor:
    return (table.long()[:, None] * block_size + torch.arange(block_size)).view(-1)
