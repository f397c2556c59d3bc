"""AWQ, GPTQ and FP8 checkpoints written by the tests (`quant_checkpoints`) in their exact
on-disk layouts: greedy output identical to HF transformers (float32) running the
dequantized weights wherever HF's top-2 margin is clear; dynamic FP8 and AWQ-shaped dummy
weights; bad checkpoints refused with errors that name what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_runner.config import EngineConfig
from model_runner.model_source import ModelSourceError
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from tests.conftest import needs_int8_dot
from tests.model_runner.driver import generate
from tests.model_runner.quant_checkpoints import (
    TINY,
    assert_same_where_clear,
    fp8_dequantize,
    fp8_tensors,
    greedy_with_margins,
    projection_names,
    tiny_llama,
    write_quantized,
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 1, 2, 77, 31, 90], [7, 7, 7], [100]]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

FORMATS = {
    "awq-g32": ("awq", dict(group=32), "awq 4-bit g32"),
    "gptq-g32": ("gptq", dict(bits=4, group=32, act_order=False), "gptq 4-bit g32 (w4a16)"),
    "gptq-act-order": ("gptq", dict(bits=4, group=32, act_order=True), "act-order"),
    "gptq-8bit-g64": ("gptq", dict(bits=8, group=64, act_order=False), "gptq 8-bit g64"),
    "fp8-tensor": ("fp8", dict(per_channel=False, static=False), "fp8"),
    "fp8-channel-static": ("fp8", dict(per_channel=True, static=True), "fp8"),
}


def runner_for(folder, **kw) -> ModelRunner:
    config = EngineConfig(**{"model": str(folder), "dtype": "float32", "kv_cache_memory": 0.001}
                          | kw)  # fmt: skip
    return ModelRunner(config, progress=False)


def assert_greedy_matches(runner, hf_model) -> int:
    """Every prompt's greedy tokens against HF's; returns how many tokens were compared."""
    ours = generate(runner, PROMPTS, GREEDY)
    compared = 0
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ref, margins = greedy_with_margins(hf_model, prompt, NEW_TOKENS)
        compared += assert_same_where_clear(got, ref, margins)
    return compared


@pytest.mark.parametrize("case", FORMATS)
def test_greedy_matches_hf_on_the_dequantized_weights(case, tmp_path):
    fmt, kw, kind = FORMATS[case]
    hf_model = tiny_llama()
    write_quantized(hf_model, tmp_path, fmt, **kw)
    runner = runner_for(tmp_path)
    assert runner.linear_plan.quantization == fmt
    method = runner.model.layers[0].qkv_proj.method
    assert kind in repr(runner.model.layers[0].qkv_proj)
    if kw.get("static"):  # fused q/k/v: the largest of their static input scales
        assert float(method.input_scale) == pytest.approx(0.05)
    assert assert_greedy_matches(runner, hf_model) >= len(PROMPTS) * NEW_TOKENS // 2


# Older folders: the settings in a file beside config.json, without a quant_method.
SIDECARS = {
    "autoawq-quant_config": ("awq", dict(group=32), "quant_config.json",
                             {"zero_point": True, "q_group_size": 32, "w_bit": 4,
                              "version": "GEMM"}, "awq 4-bit g32"),
    "autogptq-quantize_config": ("gptq", dict(bits=4, group=32, act_order=True),
                                 "quantize_config.json",
                                 {"bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                                  "true_sequential": True, "model_file_base_name": "model"},
                                 "gptq 4-bit g32, act-order"),
}  # fmt: skip


@pytest.mark.parametrize("case", SIDECARS)
def test_quant_settings_beside_config_json_are_read(case, tmp_path):
    fmt, kw, sidecar, settings, kind = SIDECARS[case]
    hf_model = tiny_llama()
    write_quantized(hf_model, tmp_path, fmt, **kw)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / sidecar).write_text(json.dumps(settings))
    runner = runner_for(tmp_path)
    assert runner.linear_plan.quantization == fmt
    assert kind in repr(runner.model.layers[0].qkv_proj)
    assert assert_greedy_matches(runner, hf_model) >= len(PROMPTS) * NEW_TOKENS // 2


def test_gptq_v2_zeros_are_read_as_stored(tmp_path):
    """checkpoint_format gptq_v2 (GPTQModel) stores the zero points themselves, v1 stores
    zero - 1: the same weights in v2 give the same tokens as HF on them."""
    from tests.model_runner.quant_checkpoints import pack_columns, unpack_columns

    hf_model = tiny_llama()
    write_quantized(hf_model, tmp_path, "gptq", bits=4, group=32, act_order=False)
    state = load_file(tmp_path / "model.safetensors")
    for name in [n for n in state if n.endswith(".qzeros")]:
        zeros = unpack_columns(state[name], 4) + 1  # v1's stored zero - 1
        assert int(zeros.max()) <= 15  # NOTE: a zero of 16 (v1's wrapped 0) has no v2 form
        state[name] = pack_columns(zeros, 4)
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = runner_for(tmp_path)
    assert runner.model.layers[0].qkv_proj.method.quant.zero_offset == 0
    assert assert_greedy_matches(runner, hf_model) >= len(PROMPTS) * NEW_TOKENS // 2


def test_quantization_none_dequantizes_an_awq_checkpoint(tmp_path):
    hf_model = tiny_llama()
    write_quantized(hf_model, tmp_path, "awq", group=32)
    runner = runner_for(tmp_path, quantization="none")
    assert "dense" in repr(runner.model.layers[1].gate_up_proj)
    assert assert_greedy_matches(runner, hf_model) >= len(PROMPTS) * NEW_TOKENS // 2


def test_dynamic_fp8_of_a_float_checkpoint(tmp_path):
    """--quantization fp8 quantizes per output channel at load; HF gets the same rounding."""
    hf_model = tiny_llama(seed=1)
    hf_model.save_pretrained(tmp_path)
    runner = runner_for(tmp_path, quantization="fp8")
    for name in projection_names(hf_model):
        linear = hf_model.get_submodule(name)
        linear.weight.data.copy_(fp8_dequantize(fp8_tensors(linear.weight, True, False)))
    assert "fp8" in repr(runner.model.layers[0].down_proj)
    assert assert_greedy_matches(runner, hf_model) >= len(PROMPTS) * NEW_TOKENS // 2


@pytest.mark.parametrize("quant", ["awq", "gptq", "fp8"])
def test_dummy_weights_in_each_format(quant, tmp_path):
    """The GPU suite's AWQ-shaped and FP8 dummy models, at a tiny shape."""
    import transformers

    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    runner = ModelRunner(EngineConfig(load_format="dummy", hf_config_path=str(tmp_path),
                                      quantization=quant, dtype="float32",
                                      kv_cache_memory=0.001), progress=False)  # fmt: skip
    assert quant in repr(runner.model.layers[0].o_proj)
    tokens = generate(runner, PROMPTS[:1], GREEDY)[0]
    assert len(tokens) == NEW_TOKENS and all(0 <= t < TINY["vocab_size"] for t in tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dummy_weights_of_a_quantized_config_are_quantized_in_its_layout(dtype, tmp_path):
    """--load-format dummy with a quantized model's config.json (a benchmark of its shape):
    the random floats are quantized in the config's layout, not served dense under its name
    (bfloat16 on the CPU would take the int8-dot route of stored 4-bit planes)."""
    import transformers

    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = ModelRunner(EngineConfig(load_format="dummy", hf_config_path=str(tmp_path),
                                      dtype=dtype, kv_cache_memory=0.001),
                         progress=False)  # fmt: skip
    assert runner.linear_plan.quantization == "gptq"
    assert "gptq 8-bit g32 (w4a16)" in repr(runner.model.layers[0].qkv_proj)
    assert len(generate(runner, PROMPTS[:1], GREEDY)[0]) == NEW_TOKENS


# --- bad checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awq")
    write_quantized(tiny_llama(), folder, "awq", group=32)
    return folder


def _edit(src, dst, tensors=None, quant_config=None):
    """A copy of checkpoint `src` in `dst` with tensors edited by `tensors(dict)` and the
    quantization_config replaced by `quant_config`."""
    state = load_file(src / "model.safetensors")
    if tensors is not None:
        tensors(state)
    save_file(state, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


Q_PROJ = "model.layers.0.self_attn.q_proj"
BAD_TENSORS = {
    "missing-scales": (lambda s: s.pop(f"{Q_PROJ}.scales"), [Q_PROJ, "missing scales"]),
    "wrong-qzeros-shape": (
        lambda s: s.update({f"{Q_PROJ}.qzeros": s[f"{Q_PROJ}.qzeros"][:1]}),
        [f"{Q_PROJ}.qzeros", "shape (1, 8)", "expected (2, 8)"],
    ),
}


def assert_refused(folder, expected: list[str]) -> None:
    with pytest.raises(ModelSourceError) as e:
        runner_for(folder)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_are_named(case, awq_folder, tmp_path):
    edit, expected = BAD_TENSORS[case]
    assert_refused(_edit(awq_folder, tmp_path, tensors=edit), expected)


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
BAD_CONFIGS = {
    "unknown-method": ({"quant_method": "hqq"}, ["unsupported quant_method 'hqq'"]),
    "awq-3-bit": (AWQ | {"bits": 3}, ["awq bits 3"]),
    "awq-gemv": (AWQ | {"version": "gemv"}, ["awq version 'gemv'", "gemm"]),
    "group-48": (AWQ | {"group_size": 48}, ["group_size 48", "multiple of 32"]),
    "gptq-marlin": ({"quant_method": "gptq", "bits": 4, "group_size": 32,
                     "checkpoint_format": "marlin"}, ["checkpoint_format 'marlin'"]),
    "gptq-is-marlin-format": ({"quant_method": "gptq", "bits": 4, "group_size": 32,
                               "is_marlin_format": True}, ["is_marlin_format"]),
    "gptq-dynamic-bits": ({"quant_method": "gptq", "bits": 4, "group_size": 32,
                           "dynamic": {"+:.*down_proj.*": {"bits": 8}}},
                          ["dynamic rule '+:.*down_proj.*'", "{'bits': 8}"]),
    "fp8-blocks": ({"quant_method": "fp8", "weight_block_size": [128, 128]},
                   ["weight_block_size"]),
    "fp8-asymmetric": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                            "num_bits": 8, "type": "float", "symmetric": False}}}},
                       ["weights symmetric False"]),
    "int4-compressed": ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
                        ["format 'pack-quantized'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_unsupported_variants_are_named(case, awq_folder, tmp_path):
    qc, expected = BAD_CONFIGS[case]
    assert_refused(_edit(awq_folder, tmp_path, quant_config=qc), expected + ["config.json"])


def test_a_format_other_than_the_checkpoints_is_refused(awq_folder):
    from model_runner.linear_plan import QuantizationError

    with pytest.raises(QuantizationError, match="the checkpoint is awq-quantized"):
        runner_for(awq_folder, quantization="gptq")


@pytest.mark.parametrize("fmt", ["awq", "fp8"])
def test_quantized_tensors_without_a_quantization_config_are_refused(fmt, tmp_path):
    kw = dict(group=32) if fmt == "awq" else dict(per_channel=False, static=False)
    write_quantized(tiny_llama(), tmp_path, fmt, **kw)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    part = "qweight" if fmt == "awq" else "weight_scale"
    assert_refused(tmp_path, [f"{part} is a quantized tensor", "no quantization_config"])


def test_fp8_static_scales_must_be_there(tmp_path):
    model = tiny_llama()
    write_quantized(model, tmp_path, "fp8", per_channel=False, static=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    _edit(tmp_path, broken, tensors=lambda s: s.pop(f"{Q_PROJ}.input_scale"))
    assert_refused(broken, [f"{Q_PROJ}: missing input_scale"])


# --- the FP8 KV cache -------------------------------------------------------------------


def _round_through_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ((x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).to(
        x.dtype
    )


def test_fp8_kv_cache_with_checkpoint_scales(tmp_path, monkeypatch):
    """--kv-cache-dtype fp8 reads the checkpoint's per-layer k_scale/v_scale and gives the
    tokens of a float cache whose K/V are rounded through FP8 by the same scales (its twin,
    run here with the rounding patched into the cache write); block copies move the bits."""
    from kernels import ops

    tiny_llama().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.self_attn.k_scale"] = torch.tensor(0.5)
    state["model.layers.1.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    runner = runner_for(tmp_path, kv_cache_dtype="fp8")
    assert runner.kv_cache.storage.dtype == torch.float8_e4m3fn
    assert runner.paths.decode_context is None
    assert runner.model.layers[1].kv_scales == (0.5, 0.25)
    assert runner.model.layers[0].kv_scales == (1.0, 1.0)
    ours = generate(runner, PROMPTS, GREEDY)
    twin = runner_for(tmp_path)
    twin.paths.decode_context = None  # NOTE: it would attend over the unrounded new K/V
    write_kv = ops.write_kv

    def rounded_write(key, value, kc, vc, slots, all_valid=False, k_scale=1.0, v_scale=1.0):
        write_kv(_round_through_fp8(key, k_scale), _round_through_fp8(value, v_scale), kc, vc,
                 slots, all_valid)  # fmt: skip

    monkeypatch.setattr(ops, "write_kv", rounded_write)
    assert generate(twin, PROMPTS, GREEDY) == ours
    runner.kv_cache.copy_blocks([(0, 1)])
    storage = runner.kv_cache.storage.view(torch.uint8)
    assert torch.equal(storage[:, :, 1], storage[:, :, 0])


# The names vLLM reads a layer's KV-cache scales by (weight_utils.maybe_remap_kv_scale_name,
# compressed-tensors' cache-scale mapper): -> the layer's (k_scale, v_scale).
KV_SCALE_LAYOUTS = {
    "compressed-tensors": ({"self_attn.k_scale": 0.5, "self_attn.v_scale": 0.25}, (0.5, 0.25)),
    "compressed-tensors-output-scale": (
        {"self_attn.k_proj.output_scale": 0.5, "self_attn.v_proj.output_scale": 0.25},
        (0.5, 0.25),
    ),
    "modelopt": (
        {"self_attn.k_proj.k_scale": 0.5, "self_attn.v_proj.v_scale": 0.25},
        (0.5, 0.25),
    ),  # fmt: skip
    "deprecated-kv-scale": ({"self_attn.kv_scale": 0.5}, (0.5, 0.5)),
}


def _biased_llama_folder(folder, scales: dict[str, torch.Tensor]):
    """A tiny Llama with q/k/v biases (as Qwen2 has; no o_proj one) and extra layer-1
    tensors `scales`."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attention_bias=True))
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state = {n: t for n, t in state.items() if not n.endswith("o_proj.bias")}  # Qwen2's
    state |= {f"model.layers.1.{name}": value for name, value in scales.items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return model.eval()


@pytest.mark.parametrize("layout", KV_SCALE_LAYOUTS)
def test_kv_scales_are_read_by_every_name_vllm_reads(layout, tmp_path):
    """Each checkpoint naming of the KV scales reaches the layer, and none of them is taken
    for a projection's bias (the model has q/k/v biases)."""
    names, want = KV_SCALE_LAYOUTS[layout]
    hf_model = _biased_llama_folder(tmp_path, {n: torch.tensor(v) for n, v in names.items()})
    runner = runner_for(tmp_path, kv_cache_dtype="fp8")
    assert runner.model.layers[1].kv_scales == want
    assert runner.model.layers[0].kv_scales == (1.0, 1.0)
    bias = runner.model.layers[1].qkv_proj.bias
    layer = hf_model.model.layers[1].self_attn
    hf_bias = torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
    assert torch.equal(bias.float(), hf_bias.float())


def test_per_head_kv_scales_are_refused_by_an_fp8_cache_only(tmp_path):
    _biased_llama_folder(tmp_path, {"self_attn.k_scale": torch.ones(2) * 3})
    with pytest.raises(ModelSourceError, match="layer 1: the checkpoint's k/v scales are not"):
        runner_for(tmp_path, kv_cache_dtype="fp8")
    plain = tmp_path / "plain"
    plain.mkdir()
    _biased_llama_folder(plain, {})
    runner = runner_for(tmp_path)  # a float32 cache never reads the scales
    assert runner.kv_cache.storage.dtype == torch.float32
    assert generate(runner, PROMPTS, GREEDY) == generate(runner_for(plain), PROMPTS, GREEDY)


@needs_int8_dot
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_bf16_cpu_serves_4bit_checkpoints_with_the_int8_dot_kernels(fmt, tmp_path):
    """bfloat16 on the CPU: AWQ/GPTQ 4-bit weights go to the CPU's quantized kernels (and its
    fused decode layers), their planes exactly the checkpoint's weights; the logits (int8
    activations, bf16) stay within 5% of HF's float32 ones on the dequantized weights."""
    from kernels.quant_linear import int4_dequantize
    from model_runner.attention import AttentionMetadata
    from model_runner.quant.checkpoint_quant import read_checkpoint_quant
    from model_runner.quant.group_quant import awq_tensor, gptq_tensor, int4_planes
    from model_runner.quant.quantized_linear import QuantizedLinear

    kw = dict(group=64) if fmt == "awq" else dict(bits=4, group=64, act_order=False)
    hf_model = tiny_llama()
    write_quantized(hf_model, tmp_path, fmt, **kw)
    runner = runner_for(tmp_path, dtype="bfloat16", cpu_int4_max_rows=-1)
    assert runner.linear_plan.cpu_planes and runner.linear_plan.kernel == "int8-dot"
    method = runner.model.layers[0].gate_up_proj.method
    assert isinstance(method, QuantizedLinear) and method.layout == "q4"
    assert "int8-dot" in repr(runner.model.layers[0].gate_up_proj)
    name = "model.layers.0.mlp.gate_proj"
    stored = load_file(tmp_path / "model.safetensors")
    parts = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(name + ".")}
    source = (awq_tensor if fmt == "awq" else gptq_tensor)(
        name, parts, read_checkpoint_quant(tmp_path / "config.json")
    )
    planes = int4_planes(source)
    weight = int4_dequantize(planes.q, planes.scales_zeros(torch.float32), 32)
    assert torch.equal(weight, hf_model.get_submodule(name).weight.float())  # exact
    ids = PROMPTS[0]
    n = len(ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.tensor([[0]], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n, max_seq_len=n,
    )  # fmt: skip
    with torch.inference_mode():
        ours = runner.model(torch.tensor(ids), torch.arange(n), runner.kv_cache.layers, meta,
                            torch.arange(n))  # fmt: skip
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).norm() / ref.norm() < 0.05
    tokens = generate(runner, PROMPTS, GREEDY)  # decode steps through the fused CPU layers
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(PROMPTS)


def test_gptq_dynamic_rules_that_keep_the_layout_are_served():
    from model_runner.quant.checkpoint_quant import parse_quantization_config

    rules = {"-:model.layers.0.mlp.*": {}, "+:.*q_proj.*": {"bits": 4, "sym": True}}
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": rules}
    assert parse_quantization_config(qc).bits == 4


def test_a_quantized_draft_model_is_served_in_its_format(tmp_path):
    """A draft model's folder is read like a target's: its quantization_config too."""
    from model_runner.draft_model import DraftModel
    from model_runner.gguf_loader import load_model_config
    from model_runner.model_source import resolve_model

    write_quantized(tiny_llama(), tmp_path, "awq", group=32)
    config = EngineConfig(model=str(tmp_path), dtype="float32")
    source = resolve_model(config)
    draft = DraftModel(config, source, load_model_config(source), torch.float32,
                       torch.device("cpu"), 256, progress=False)  # fmt: skip
    assert "awq 4-bit g32" in repr(draft.model.layers[0].qkv_proj)
