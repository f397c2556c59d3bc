"""The FP8 KV cache (`--kv-cache-dtype fp8`): per-tensor scaled writes, and paged attention
over FP8 blocks (torch reference and Triton, interpreted on the CPU) against attention over
the same values dequantized into a float cache."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import KV_FP8, write_kv_ref
from kernels.kv_cache_triton import write_kv_triton
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_triton import paged_attention_triton
from tests.kernels.helpers import assert_close, make_paged_batch, randn

K_SCALE, V_SCALE = 0.05, 0.02


def test_write_quantizes_by_the_scale(device):
    gen = torch.Generator().manual_seed(0)
    key = randn(5, 2, 16, dtype=torch.float32, device=device, gen=gen)
    value = randn(5, 2, 16, dtype=torch.float32, device=device, gen=gen) * 4
    slots = torch.tensor([3, 0, -1, 17, 9], device=device)
    caches = {}
    for name, write in (("ref", write_kv_ref), ("triton", write_kv_triton)):
        kc = torch.zeros(3, 8, 2, 16, dtype=KV_FP8, device=device)
        vc = torch.zeros_like(kc)
        write(key, value, kc, vc, slots, k_scale=K_SCALE, v_scale=V_SCALE)
        caches[name] = kc.float().view(-1, 2, 16), vc.float().view(-1, 2, 16)
    ref_k, ref_v = caches["ref"]
    valid = slots >= 0
    want_k = (key[valid] / K_SCALE).to(KV_FP8).float()
    assert torch.equal(ref_k[slots[valid]], want_k)
    want_v = (value[valid] / V_SCALE).clamp(-448, 448).to(KV_FP8).float()
    assert torch.equal(ref_v[slots[valid]], want_v)
    assert ref_k[1].abs().sum() == 0  # slot -1 wrote nothing
    for got, want in zip(caches["triton"], caches["ref"], strict=True):
        same = got == want
        if not got.is_cuda:
            # NOTE: Triton's CPU interpreter drops the carry when rounding up crosses a power
            # of two (31.5 -> 16, not 32); the GPU converts in hardware, as torch does.
            same |= (got * 2 == want) & (torch.frexp(want).mantissa.abs() == 0.5)
        assert same.all()


def fp8_batch(dtype, device, query_lens, context_lens):
    batch = make_paged_batch(query_lens, context_lens, num_heads=4, num_kv_heads=2,
                             head_dim=32, block_size=16, dtype=dtype, device=device,
                             seed=sum(query_lens))  # fmt: skip
    k8 = (batch.clean_key_cache.float() / K_SCALE * 0.1).to(KV_FP8)
    v8 = (batch.clean_value_cache.float() / V_SCALE * 0.1).to(KV_FP8)
    # the float cache holding exactly the values the FP8 one stands for
    return batch, k8, v8, (k8.float() * K_SCALE).to(dtype), (v8.float() * V_SCALE).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [([1, 1, 1], [40, 7, 20]), ([5, 1, 17], [0, 33, 3])])
def test_attention_over_fp8_blocks(lens, dtype, device):
    batch, k8, v8, k_float, v_float = fp8_batch(dtype, device, *lens)
    common = (batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.2)
    want = paged_attention_ref(batch.query, k_float, v_float, *common)
    scales = dict(k_scale=K_SCALE, v_scale=V_SCALE)
    got_ref = paged_attention_ref(batch.query, k8, v8, *common, **scales)
    assert_close(got_ref, want, dtype)
    got = paged_attention_triton(batch.query, k8, v8, *common, **scales)
    assert_close(got, want, dtype)
