"""Reading a GGUF file: the model config from its metadata, and its weights as stored.

Float tensors come as float32 arrays; quantized ones as `GGUFBlocks` (the raw blocks), which
each destination dequantizes or converts to its kernel layout (model_runner.linear).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_runner.model_source import (
    ModelConfig,
    ModelSource,
    ModelSourceError,
    check_gguf_arch_supported,
    model_config_from_hf,
)

# llama.cpp tensor name (after "blk.N.") -> the Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path):
    """A memory-mapped gguf.GGUFReader (parsing the metadata takes a few seconds)."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1))}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def model_config_from_gguf(reader) -> ModelConfig:
    """The ModelConfig from GGUF metadata (`<arch>.*` keys and `tokenizer.ggml.*`)."""
    arch = _field(reader, "general.architecture")
    check_gguf_arch_supported(arch)
    names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        num_kv_heads = num_kv_heads[0]
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = [
        _field(reader, "tokenizer.ggml.eos_token_id"),
        _field(reader, "tokenizer.ggml.eot_token_id"),
    ]
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos if t is not None)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        architecture=arch,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def check_gguf_tensor_types(type_names) -> None:
    """Refuse, before loading, tensor types that gguf cannot dequantize (ModelSourceError)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    unsupported = []
    for name in sorted(type_names):
        qtype = GGMLQuantizationType[name]
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:  # NOTE: one zero block dequantizes in no time, or raises for a type gguf lacks
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            unsupported.append(name)
    if unsupported:
        raise ModelSourceError(f"unsupported GGUF tensor type(s): {', '.join(unsupported)}")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a llama.cpp tensor name, or None if unknown."""
    match = _LAYER_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def unpermute_rotary(weights, num_heads: int):
    """Undo llama.cpp's row permutation of attn_q/attn_k (its interleaved rotary layout).

    NOTE: the exact inverse of convert_hf_to_gguf's `permute` (as transformers undoes it):
    rows of each head are stored as [dim/2, 2] pairs and go back to [2, dim/2] halves.
    GGUF blocks move with their rows.
    """
    if isinstance(weights, GGUFBlocks):
        return GGUFBlocks(weights.qtype, unpermute_rotary(weights.data, num_heads))
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


@dataclass(frozen=True)
class GGUFBlocks:
    """A quantized GGUF tensor as stored: `data` [rows, bytes per row] of ggml blocks.

    Blocks run along a row (the input features), so a row permutation moves whole rows.
    """

    qtype: object  # gguf.GGMLQuantizationType
    data: np.ndarray

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def shape(self) -> tuple[int, int]:
        from gguf import GGML_QUANT_SIZES

        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.data.shape[0], self.data.shape[1] // type_size * block_size

    def dequantize(self) -> np.ndarray:
        """The float32 [rows, cols] weight, as gguf (and HF transformers) dequantize it."""
        from gguf import dequantize

        return dequantize(self.data, self.qtype)


def _as_stored(tensor) -> np.ndarray | GGUFBlocks:
    from gguf import GGMLQuantizationType

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32)
    if tensor.tensor_type == GGMLQuantizationType.BF16:
        from gguf import dequantize

        return dequantize(tensor.data, tensor.tensor_type)
    return GGUFBlocks(tensor.tensor_type, np.asarray(tensor.data))


def iter_gguf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, np.ndarray | GGUFBlocks]]:
    """Yield (Hugging Face name, float32 array or GGUFBlocks) for every tensor the model uses."""
    permuted = config.architecture in ("llama", "mistral")
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        weights = _as_stored(tensor)
        if permuted and ".self_attn.q_proj." in name:
            weights = unpermute_rotary(weights, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weights = unpermute_rotary(weights, config.num_kv_heads)
        yield name, weights


def gguf_tensor_count(reader) -> int:
    return len(reader.tensors)


def load_model_config(source: ModelSource, gguf_reader=None) -> ModelConfig:
    """The ModelConfig of a resolved source (GGUF metadata or config.json)."""
    if source.config_path.suffix == ".gguf":
        reader = gguf_reader if gguf_reader is not None else open_gguf(source.config_path)
        return model_config_from_gguf(reader)
    return model_config_from_hf(source.config_path)
