"""The same comparisons at real (Llama-3-8B) sizes on a CUDA GPU: `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.activation import silu_and_mul_ref
from kernels.activation_triton import silu_and_mul_triton
from kernels.kv_cache import write_kv_ref
from kernels.kv_cache_triton import write_kv_triton
from kernels.layernorm import fused_add_rms_norm_ref
from kernels.layernorm_triton import fused_add_rms_norm_triton
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_triton import _auto_num_splits, paged_attention_triton
from kernels.rotary import build_cos_sin_cache, rotary_embedding_ref
from kernels.rotary_triton import rotary_embedding_triton
from tests.kernels.helpers import assert_close, make_paged_batch, poison_like, randn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _attention(lens, dtype, **kwargs):
    batch = make_paged_batch(
        *lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype,
        device="cuda", seed=len(lens[0]),
    )  # fmt: skip
    scale = 128**-0.5
    got = paged_attention_triton(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, scale, out=poison_like(batch.query), **kwargs,
    )  # fmt: skip
    want = paged_attention_ref(
        batch.query, batch.clean_key_cache, batch.clean_value_cache, batch.block_tables,
        batch.seq_lens, batch.query_start_loc, scale,
    )  # fmt: skip
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_real_size(dtype):
    gen = torch.Generator().manual_seed(0)
    decode_ctx = torch.randint(100, 2500, (30,), generator=gen).tolist()
    lens = ([1] * 30 + [512, 333, 1024], decode_ctx + [1000, 0, 77])
    _attention(lens, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_decode_splits_automatically(dtype):
    lens = ([1, 1], [8191, 5000])
    assert _auto_num_splits(torch.empty(1, device="cuda"), 2 * 8, 8192) > 1
    _attention(lens, dtype)
    _attention(lens, dtype, num_kv_splits=1)


def test_elementwise_kernels_real_size():
    gen = torch.Generator().manual_seed(1)
    dt, tokens, hidden = torch.bfloat16, 4096, 4096
    x = randn(tokens, hidden, dtype=dt, device="cuda", gen=gen)
    residual = randn(tokens, hidden, dtype=dt, device="cuda", gen=gen)
    weight = randn(hidden, dtype=dt, device="cuda", gen=gen)
    normed, summed = fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    want = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(summed, want[1])
    assert_close(normed, want[0], dt)
    gate_up = randn(tokens, 2 * 14336, dtype=dt, device="cuda", gen=gen)
    assert_close(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up), dt)
    q = randn(tokens, 32, 128, dtype=dt, device="cuda", gen=gen)
    k = randn(tokens, 8, 128, dtype=dt, device="cuda", gen=gen)
    cache = build_cos_sin_cache(128, 8192, 500000.0).cuda()
    positions = torch.randint(0, 8192, (tokens,), generator=gen).cuda()
    for got, want in zip(
        rotary_embedding_triton(positions, q, k, cache),
        rotary_embedding_ref(positions, q, k, cache),
        strict=True,
    ):
        assert_close(got, want, dt)
    k_cache = randn(512, 16, 8, 128, dtype=dt, device="cuda", gen=gen)
    v_cache = randn(512, 16, 8, 128, dtype=dt, device="cuda", gen=gen)
    slots = torch.randperm(512 * 16, generator=gen)[:tokens].cuda()
    slots[::7] = -1
    k_want, v_want = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, k, k_want, v_want, slots)
    write_kv_triton(k, k, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_ops_dispatch_to_triton_on_cuda(monkeypatch):
    calls = []
    import kernels.activation_triton as act

    real = act.silu_and_mul_triton
    monkeypatch.setattr(act, "silu_and_mul_triton", lambda x: calls.append(x) or real(x))
    ops.silu_and_mul(torch.randn(4, 64, device="cuda"))
    assert len(calls) == 1
