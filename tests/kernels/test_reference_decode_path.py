"""The reference's decode-only fast path against per-sequence SDPA on un-paged inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.kv_cache import write_kv_ref
from kernels.paged_attention import paged_attention_ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (8, 1)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_path_matches_sdpa(dtype, tol, heads, kv_heads, window):
    gen = torch.Generator().manual_seed(heads * 31 + kv_heads + (window or 0))
    dim, block, num_blocks, seq_lens = 64, 16, 24, [1, 17, 40, 33]
    key_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), 3, dtype=torch.int32)
    keys, values = [], []
    for i, n in enumerate(seq_lens):
        for j in range(-(-n // block)):
            tables[i, j] = perm.pop()
        k = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        slots = torch.tensor([int(tables[i, p // block]) * block + p % block for p in range(n)])
        write_kv_ref(k, v, key_cache, value_cache, slots)
        keys.append(k)
        values.append(v)
    query = torch.randn(len(seq_lens), heads, dim, generator=gen).to(dtype)
    qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention_ref(query, key_cache, value_cache, tables, lens, qsl, dim**-0.5,
                              max_query_len=1, sliding_window=window)  # fmt: skip
    assert out.dtype == dtype and out.shape == query.shape
    for i, n in enumerate(seq_lens):
        lo = 0 if window is None else max(0, n - window)
        k = keys[i][lo:].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        v = values[i][lo:].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(query[i].float()[:, None], k, v)[:, 0]
        err = (out[i].float() - ref).norm() / ref.norm()
        assert err < tol, (i, err)
