"""Compile every Triton kernel ahead of time for an H100 (sm_90a) on a machine without a GPU.

Run as `python -m tests.kernels.compile_sm90` (TRITON_INTERPRET must be unset): prints one
JSON object per compiled variant with its registers, stack bytes (spills), shared memory and
whether the TTGIR uses Hopper wgmma and cp.async pipelining. `test_compile_sm90.py` runs it.
Arguments are specialised the way Triton's launcher would (16-divisible ints and pointers).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import (
    activation_triton,
    kv_cache_triton,
    layernorm_triton,
    lora_triton,
    rotary_triton,
    w4a16_triton,
)
from kernels import paged_attention_triton as pa

H100 = GPUTarget("cuda", 90, 32)
DEFAULT_INT = 4096  # strides and sizes of the Llama-3-8B shapes are multiples of 16


def compile_variant(fn, pointers: dict, ints: dict, constexprs: dict, num_warps, num_stages):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("s_mul", "cap_mul", "eps", "scale", "k_mul", "v_mul"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if ints.get(name, DEFAULT_INT) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    cexpr = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn, sig, constexprs=cexpr, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=H100, options=opts)


def resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", text)}


def _attention_variants():
    ptrs = {n: "*bf16" for n in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")}
    ptrs |= {n: "*fp32" for n in ("part_acc_ptr", "part_m_ptr", "part_l_ptr")}
    ptrs |= {n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
    ints = {"stride_bt": 129, "num_seqs": 7, "q_len_lo": 3, "sliding_window": 7}
    meta = dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16)
    meta |= dict(USE_WINDOW=False, USE_SOFT_CAP=False, DOT_PRECISION="tf32", UPCAST=False)
    for name, prefill, splits, extra in [
        ("attention_decode_bf16", False, 1, {}),
        ("attention_decode_split8_bf16", False, 8, {}),
        ("attention_prefill_bf16", True, 1, {}),
        (
            "attention_prefill_window_softcap_bf16",
            True,
            1,
            dict(USE_WINDOW=True, USE_SOFT_CAP=True),
        ),
    ]:
        cfg = pa._tile_config(prefill, 4, pa.torch.bfloat16)
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = meta | cfg | extra | dict(BLOCK_Q=cfg["BLOCK_M"] // 4, NUM_SPLITS=splits)
        yield name, pa._paged_attention_kernel, ptrs, ints, consts, launch
    fp8_cache = ptrs | {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"}
    cfg = pa._tile_config(False, 4, pa.torch.bfloat16)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    consts = meta | cfg | dict(BLOCK_Q=cfg["BLOCK_M"] // 4, NUM_SPLITS=1)
    yield "attention_decode_fp8kv", pa._paged_attention_kernel, fp8_cache, ints, consts, launch
    fp32 = {k: v.replace("bf16", "fp32") for k, v in ptrs.items()}
    cfg = pa._tile_config(True, 4, pa.torch.float32)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    consts = meta | cfg | dict(BLOCK_Q=cfg["BLOCK_M"] // 4, NUM_SPLITS=1, DOT_PRECISION="ieee")
    yield "attention_prefill_fp32", pa._paged_attention_kernel, fp32, ints, consts, launch
    red = dict(GROUP=4, GROUP_PAD=4, NUM_SPLITS=8, SPLITS_PAD=8, HEAD_DIM=128, HEAD_DIM_PAD=128)
    yield (
        "attention_reduce",
        pa._reduce_splits_kernel,
        ptrs,
        ints,
        red,
        dict(num_warps=4, num_stages=1),
    )


def _elementwise_variants():
    bf16 = {n: "*bf16" for n in ("x_ptr", "out_ptr", "residual_ptr", "weight_ptr", "sum_out_ptr",
                                 "key_ptr", "value_ptr", "key_cache_ptr", "value_cache_ptr",
                                 "q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr")}  # fmt: skip
    bf16 |= {"slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cache_ptr": "*fp32"}
    w4 = dict(num_warps=4, num_stages=1)
    yield "silu_and_mul", activation_triton._silu_and_mul_kernel, bf16, {}, dict(BLOCK=1024), w4
    kv = dict(NUM_KV_HEADS=8, HEAD_DIM=128, HEADS_PAD=8, DIM_PAD=128, BLOCK_SIZE=16)
    yield "write_kv", kv_cache_triton._write_kv_kernel, bf16, {}, kv | dict(CACHE_FP8=False), w4
    fp8 = bf16 | {"key_cache_ptr": "*fp8e4nv", "value_cache_ptr": "*fp8e4nv"}
    yield "write_kv_fp8", kv_cache_triton._write_kv_kernel, fp8, {}, kv | dict(CACHE_FP8=True), w4
    for fused in (False, True):
        consts = dict(BLOCK=4096, FUSED_ADD=fused)
        yield (
            f"rms_norm_fused{int(fused)}",
            layernorm_triton._rms_norm_kernel,
            bf16,
            {},
            consts,
            dict(num_warps=8, num_stages=1),
        )
    for neox in (True, False):
        consts = dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, Q_PAD=32, K_PAD=8, HEAD_DIM=128,
                      DIM_PAD=128, ROT_HALF=64, HALF_PAD=64, IS_NEOX=neox)  # fmt: skip
        yield f"rotary_neox{int(neox)}", rotary_triton._rotary_kernel, bf16, {}, consts, w4


def _lora_variants():
    """Padded ranks 16, 48 (q/k/v of rank 16 stacked) and 1536 (q/k/v at --max-lora-rank 512),
    with the launchers' own block choices."""
    ptrs = {n: "*bf16" for n in ("x_ptr", "a_ptr", "h_ptr", "y_ptr", "b_ptr")}
    ptrs |= {"slots_ptr": "*i64", "scales_ptr": "*fp32"}
    w4 = dict(num_warps=4, num_stages=1)
    for rank in (16, 48, 1536):
        ints = {"rank": rank, "stride_h": rank}
        shrink, expand = lora_triton.shrink_blocks(rank), lora_triton.expand_blocks(rank)
        yield f"lora_shrink_r{rank}", lora_triton._lora_shrink_kernel, ptrs, ints, shrink, w4
        yield f"lora_expand_r{rank}", lora_triton._lora_expand_kernel, ptrs, ints, expand, w4


def _w4a16_variants():
    """The launcher's decode (16-row) and prefill tiles, 4-bit (and GPTQ 8-bit decode), bf16
    activations with fp16 scales (AWQ/GPTQ store fp16), Llama-3-8B's K = 4096, group 128."""
    ptrs = {"x_ptr": "*bf16", "qw_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
            "out_ptr": "*bf16"}  # fmt: skip
    ints = {"M": 7, "group_size": 128}
    for name, rows, bits in (("w4a16_decode_bf16", 1, 4), ("w4a16_prefill_bf16", 512, 4),
                             ("w8a16_decode_bf16", 1, 8)):  # fmt: skip
        cfg = w4a16_triton.tile_config(rows)
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = cfg | dict(BITS=bits, DOT_PRECISION="tf32", UPCAST=False)
        yield name, w4a16_triton._w4a16_kernel, ptrs, ints, consts, launch


def main() -> None:
    variants = [*_attention_variants(), *_elementwise_variants(), *_lora_variants(),
                *_w4a16_variants()]  # fmt: skip
    for name, fn, ptrs, ints, consts, launch in variants:
        kernel = compile_variant(fn, ptrs, ints, consts, **launch)
        ttgir = kernel.asm["ttgir"]
        print(json.dumps({
            "name": name,
            **resource_usage(kernel.asm["cubin"]),
            "shared": kernel.metadata.shared,
            "wgmma": "warp_group_dot" in ttgir,
            "cp_async": "async_copy_global_to_local" in ttgir,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
