"""Tiny quantized checkpoints written by the tests, in each exact on-disk layout.

A random tiny HF Llama is quantized round-to-nearest (this file's own quantizer), packed as
AWQ (GEMM), GPTQ (v1, optionally act-order with a shuffled g_idx) or FP8 (compressed-tensors)
and saved as a safetensors folder with its quantization_config. `dequantized` re-reads each
packed tensor with an independent bit-by-bit unpacker, and that dense weight is what the HF
reference model gets. Nothing here imports tokenmill's quantization code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.3, rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None,
    rope_theta=500.0, tie_word_embeddings=False,
)  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def projection_names(model) -> list[str]:
    return [n[: -len(".weight")] for n, _ in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS]  # fmt: skip


# --- round-to-nearest quantization ------------------------------------------------------


def rtn(weight: torch.Tensor, bits: int, group: int, g_idx: torch.Tensor):
    """Asymmetric RTN of [N, K] by g_idx's groups: q [N, K], scales and zeros [G, N]."""
    n, k = weight.shape
    groups = int(g_idx.max()) + 1
    top = 2**bits - 1
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    q = torch.empty(n, k, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero()[:, 0]
        w = weight[:, cols].float()
        lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
        s = ((hi - lo) / top).clamp(min=1e-6).half().float()
        z = torch.round(-lo / s).clamp(0, top)
        q[:, cols] = torch.round(w / s[:, None] + z[:, None]).clamp(0, top).long()
        scales[g], zeros[g] = s, z
    return q, scales.half(), zeros.long()


def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_columns(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """[R, C] ints -> int32 [R, C * bits / 32]: word c holds columns c*per + order[i] at i."""
    per = 32 // bits
    order = order or list(range(per))
    words = torch.zeros(values.shape[0], values.shape[1] // per, dtype=torch.int64)
    for i, col in enumerate(order):
        words |= (values[:, col::per].long() & (2**bits - 1)) << (bits * i)
    return to_int32(words)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] ints -> int32 [R * bits / 32, C]: word r holds rows r*per + i at bit bits*i."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for i in range(per):
        words |= (values[i::per].long() & (2**bits - 1)) << (bits * i)
    return to_int32(words)


def bit_field(words: torch.Tensor, i: int, bits: int) -> torch.Tensor:
    return (words.long() & 0xFFFFFFFF) >> (bits * i) & (2**bits - 1)


def unpack_columns(words: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    per = 32 // bits
    order = order or list(range(per))
    out = torch.empty(words.shape[0], words.shape[1] * per, dtype=torch.int64)
    for i, col in enumerate(order):
        out[:, col::per] = bit_field(words, i, bits)
    return out


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    out = torch.empty(words.shape[0] * per, words.shape[1], dtype=torch.int64)
    for i in range(per):
        out[i::per] = bit_field(words, i, bits)
    return out


# --- the on-disk layouts ----------------------------------------------------------------


def awq_tensors(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    k = weight.shape[1]
    q, scales, zeros = rtn(weight, 4, group, torch.arange(k) // group)
    return {"qweight": pack_columns(q.t(), 4, AWQ_ORDER),
            "qzeros": pack_columns(zeros, 4, AWQ_ORDER), "scales": scales}  # fmt: skip


def awq_dequantize(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    q = unpack_columns(t["qweight"], 4, AWQ_ORDER)  # [K, N]
    z = unpack_columns(t["qzeros"], 4, AWQ_ORDER).repeat_interleave(group, dim=0)
    s = t["scales"].float().repeat_interleave(group, dim=0)
    return ((q - z) * s).t()


def gptq_tensors(weight: torch.Tensor, bits: int, group: int, act_order: bool, seed: int):
    k = weight.shape[1]
    g_idx = torch.arange(k) // group
    if act_order:  # a shuffled feature order, as GPTQ's desc_act stores it
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(seed))]
    q, scales, zeros = rtn(weight, bits, group, g_idx)
    # NOTE: v1 stores zero - 1; a zero of 0 wraps to 2^bits - 1 and reads back as 2^bits,
    # as AutoGPTQ and vLLM read it.
    return {"qweight": pack_rows(q.t(), bits), "qzeros": pack_columns(zeros - 1, bits),
            "scales": scales, "g_idx": g_idx.to(torch.int32)}  # fmt: skip


def gptq_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    q = unpack_rows(t["qweight"], bits)  # [K, N]
    g = t["g_idx"].long()
    z = unpack_columns(t["qzeros"], bits)[g] + 1
    return ((q - z) * t["scales"].float()[g]).t()


def fp8_tensors(weight: torch.Tensor, per_channel: bool, static: bool) -> dict:
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (amax / 448.0).clamp(min=1e-8)
    out = {
        "weight": (w / scale).to(torch.float8_e4m3fn),
        "weight_scale": scale.reshape(-1, 1) if per_channel else scale.reshape(1),
    }
    if static:
        out["input_scale"] = torch.tensor([0.05])
    return out  # fmt: skip


def fp8_dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["weight"].float() * t["weight_scale"].float().reshape(-1, 1)


# --- whole checkpoints ------------------------------------------------------------------


def quantization_config(fmt: str, **kw) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": kw["group"], "zero_point": True,
                "version": "gemm"}  # fmt: skip
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": kw["bits"], "group_size": kw["group"],
                "desc_act": kw["act_order"], "sym": False}  # fmt: skip
    scheme = {"num_bits": 8, "type": "float", "symmetric": True}
    acts = dict(scheme, strategy="tensor" if kw["static"] else "token", dynamic=not kw["static"])
    weights = dict(scheme, strategy="channel" if kw["per_channel"] else "tensor", dynamic=False)
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}},
            "ignore": ["lm_head"]}  # fmt: skip


def quantize_projection(weight: torch.Tensor, fmt: str, seed: int, **kw):
    """(the checkpoint's tensors, the dense weight they stand for, by the test's reader)."""
    if fmt == "awq":
        t = awq_tensors(weight, kw["group"])
        return t, awq_dequantize(t, kw["group"])
    if fmt == "gptq":
        t = gptq_tensors(weight, kw["bits"], kw["group"], kw["act_order"], seed)
        return t, gptq_dequantize(t, kw["bits"])
    t = fp8_tensors(weight, kw["per_channel"], kw["static"])
    return t, fp8_dequantize(t)


def _input_seed(name: str) -> int:
    """One act-order permutation per projection input (q/k/v share one, as gate/up do)."""
    layer = int(name.split(".")[2])
    kind = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2}
    return 10 * layer + kind.get(name.split(".")[-1], 3)


def write_quantized(model, folder: Path, fmt: str, **kw) -> None:
    """Quantize every projection of `model` into `folder` and load the dequantized weights
    back into `model` (so it is the HF reference of the checkpoint)."""
    from safetensors.torch import save_file

    state = {n: p.detach().clone().contiguous() for n, p in model.state_dict().items()}
    tensors = {}
    for name in projection_names(model):
        weight = state.pop(f"{name}.weight")
        parts, dense = quantize_projection(weight, fmt, seed=_input_seed(name), **kw)
        tensors |= {f"{name}.{part}": t.contiguous() for part, t in parts.items()}
        model.get_submodule(name).weight.data.copy_(dense)
    save_file(tensors | state, folder / "model.safetensors")
    config = model.config.to_dict() | {"quantization_config": quantization_config(fmt, **kw)}
    (folder / "config.json").write_text(json.dumps(config))


def greedy_with_margins(model, prompt: list[int], new_tokens: int):
    """HF's greedy tokens and the top-2 logprob margin at each."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                             do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
    margins = []
    for scores in out.scores:
        top = scores[0].float().log_softmax(-1).topk(2).values
        margins.append(float(top[0] - top[1]))
    return out.sequences[0, len(prompt) :].tolist(), margins


def assert_same_where_clear(ours: list[int], ref: list[int], margins: list[float],
                            min_margin: float = 1e-3) -> int:  # fmt: skip
    """Tokens equal up to the first position where HF's top-2 margin is under min_margin;
    returns how many were compared."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if margins[i] <= min_margin:
            return i
        assert a == b, f"token {i}: ours {a}, HF {b} (margin {margins[i]:.4f})"
    return len(ref)
