"""Which linear method each projection gets: `--quantization`, resolved for the device and dtype.

`auto` (the default), by device, activation dtype and checkpoint:

| device | dtype    | checkpoint                         | auto serves     |
|--------|----------|------------------------------------|-----------------|
| CPU    | bfloat16 | GGUF with Q4_0 / Q4_1 / Q8_0       | `gguf`          |
| CPU    | bfloat16 | anything else                      | `none`          |
| CPU    | float32  | any (the exact mode)               | `none`          |
| CPU    | float16  | any                                | `none`          |
| CUDA   | any      | any                                | `none`          |

`none` dequantizes everything into dense weights of the activation dtype. `gguf` serves the
GGUF's Q4_0/Q4_1/Q8_0 projection tensors in a quantized kernel layout (model_runner.quant)
and dequantizes other GGUF types; `int4` / `int8` quantize float weights group-wise at load.

The quantized kernel (`--cpu-quant-kernel`, `auto` by default) is `int8-dot` where the CPU
has AVX-512 VNNI and the kernels build (`kernels.int8_dot_linear`: int8 activations, integer
dot products), else torch's `int4` GEMM. Each projection takes it for steps of up to a
measured row count and a dense bf16 copy above (`int4_max_rows`).

The LM head: with `int8-dot`, a quantized LM head too (the GGUF's Q8_0 table as stored, q8 of
a float one in the int4/int8 modes) for steps of up to `lm_head_max_rows` sampled rows,
with its dense table kept for larger steps, the token lookups and the float32 refinement of
the top logits. With torch's `int4` GEMM it stays dense: there its 8-bit planes were no
faster at one row (1.5 vs 1.6 ms on a Zen 4 CPU) and 1.3-2x slower from 8 rows on. In
`--batch-invariant` mode it stays dense (one kernel at every row count).

Checkpoint formats (`model_runner.quant.checkpoint_quant`): a config.json with a
`quantization_config` (AWQ, GPTQ, FP8) is served in its format under `auto` or its own
name, on the CPU and CUDA; `none`, `int4` and `int8` dequantize it first. `fp8` of a float
checkpoint quantizes it at load (per-channel weight scales); `awq` / `gptq` without such a
checkpoint only fill `--load-format dummy` weights (round-to-nearest, AWQ-shaped).
On the CPU with bfloat16 activations and the int8-dot kernels, AWQ/GPTQ 4-bit checkpoints
without act-order go to those kernels (`cpu_planes`; the layout converts exactly), with the
same dense-copy and LM-head rules as GGUF; otherwise the W4A16 reference serves them.

`auto` never quantizes with float32 or float16 activations (the exact mode, and torch's
4-bit GEMM is fast only with bfloat16 ones: asking for that pair warns; the int8-dot kernels
take float32 activations as fast).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_runner.config import EngineConfigError, kernel_build_dir
from model_runner.linear import (
    DenseLinear,
    DenseOptions,
    Linear,
    LinearMethod,
    RowParallelLinear,
)
from model_runner.quant.int4_weights import GGUF_INT4_TYPES

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "gguf", "int8", "int4", "none", "awq", "gptq", "fp8")
CPU_ONLY = ("gguf", "int8", "int4")  # the CPU's quantized kernels (QuantizedLinear)
CHECKPOINT_FORMATS = ("awq", "gptq", "fp8")  # model_runner.quant: W4A16Linear, Fp8Linear
CPU_QUANT_KERNELS = ("auto", "int8-dot", "int4")


class QuantizationError(EngineConfigError):
    """A --quantization that the model or device cannot serve (a user error, exit 2)."""


def check_quantization(
    requested: str,
    device: torch.device,
    source_format: str,
    checkpoint=None,
    tensor_parallel_size: int = 1,
) -> None:
    """Refuse a --quantization the device or checkpoint cannot serve (QuantizationError).
    `checkpoint`: the checkpoint's CheckpointQuant (None: float weights)."""
    if requested not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {requested!r}; one of {QUANTIZATIONS}")
    if requested in CHECKPOINT_FORMATS or checkpoint is not None:
        if tensor_parallel_size > 1:
            raise QuantizationError(
                "--tensor-parallel-size > 1 serves float and GGUF checkpoints only in this "
                "build (not awq, gptq or fp8)"
            )
        _check_checkpoint_format(requested, device, source_format, checkpoint)
        return
    if requested in ("auto", "none"):
        return
    if device.type != "cpu":
        raise QuantizationError(
            f"--quantization {requested} runs on the CPU only in this build; use "
            "--quantization none (or auto) on CUDA"
        )
    if requested == "gguf" and source_format != "gguf":
        raise QuantizationError("--quantization gguf needs a .gguf model")


def _check_checkpoint_format(requested, device, source_format, checkpoint) -> None:
    """awq / gptq / fp8 asked for, or a quantized checkpoint (see the module)."""
    if checkpoint is not None and requested not in ("auto", "none", "int4", "int8"):
        if requested != checkpoint.method:
            raise QuantizationError(
                f"--quantization {requested}: the checkpoint is {checkpoint.method}-quantized "
                f"(config.json quantization_config); use --quantization {checkpoint.method} "
                "or auto"
            )
    elif checkpoint is None and requested in ("awq", "gptq") and source_format != "dummy":
        raise QuantizationError(
            f"--quantization {requested} needs a checkpoint quantized with "
            f"{requested.upper()} (config.json with quantization_config.quant_method "
            f"{requested!r}); a float checkpoint can be served with --quantization fp8"
        )
    effective = checkpoint.method if checkpoint is not None and requested == "auto" else requested
    if effective in CPU_ONLY and device.type != "cpu":
        raise QuantizationError(
            f"--quantization {effective} runs on the CPU only in this build; use "
            "--quantization none (or auto) on CUDA"
        )
    if effective == "fp8" and device.type == "cuda" and _capability(device) < (8, 9):
        raise QuantizationError(
            "--quantization fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: "
            "Ada, Hopper); use --quantization none here"
        )


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_quantization(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    source_format: str,
    gguf_types,
    checkpoint=None,
) -> str:
    """The effective method family (none, gguf, int4, int8, awq, gptq, fp8) of `requested`.

    `gguf_types`: the GGUF tensor type names of the checkpoint (empty for other formats);
    `checkpoint`: its CheckpointQuant, None for float (or GGUF) weights.
    """
    check_quantization(requested, device, source_format, checkpoint)
    if requested == "auto" and checkpoint is not None:
        return checkpoint.method
    if requested == "auto":
        native = source_format == "gguf" and set(GGUF_INT4_TYPES) & set(gguf_types)
        fast = device.type == "cpu" and dtype == torch.bfloat16
        return "gguf" if native and fast else "none"
    return requested


def _warn_if_slow(quant: str, kernel: str, dtype: torch.dtype) -> None:
    """torch's 4-bit GEMM with float activations: asked for, never chosen (see the module)."""
    if quant != "none" and kernel == "int4" and dtype != torch.bfloat16:
        log.warning(
            "--quantization %s with %s activations is slow: torch's 4-bit GEMM is fast only "
            "with bfloat16 ones (~30x slower per projection otherwise); try --dtype bfloat16",
            quant,
            str(dtype).removeprefix("torch."),
        )


@dataclass(frozen=True)
class LinearPlan:
    """How every projection of one model is stored (built once per load)."""

    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"  # none | gguf | int4 | int8 (resolved)
    dense: DenseOptions = DenseOptions()
    # Quantized methods: steps of more rows than this take a dense copy (None: no copy).
    int4_max_rows: int | None = None
    kernel: str = "int4"  # the quantized methods' kernel: int8-dot | int4
    lm_head_max_rows: int = 0  # > 0: a quantized LM head for steps of up to this many rows
    tp: object = None  # model_runner.parallel.TensorParallel under tensor parallelism
    # The checkpoint's stored format (None: float weights); its tensors are grouped at load
    # whatever `quantization` serves them as.
    checkpoint: object = None  # model_runner.quant.checkpoint_quant.CheckpointQuant
    cpu_planes: bool = False  # AWQ/GPTQ through the CPU's quantized kernels (QuantizedLinear)
    # Dummy weights of a quantized checkpoint's config: floats quantized to its bits/groups.
    float_layout: object = None  # a CheckpointQuant

    def method(self, out_features: int, in_features: int) -> LinearMethod:
        if self.quantization == "none":
            return DenseLinear(out_features, in_features, self.dtype, self.device, self.dense)
        if self.quantization in CHECKPOINT_FORMATS:
            return self._checkpoint_format(out_features, in_features)
        return self._quantized(out_features, in_features, self.quantization, self.int4_max_rows)

    def _checkpoint_format(self, out_features: int, in_features: int) -> LinearMethod:
        """W4A16 (AWQ/GPTQ) or FP8; float shards are quantized unless the checkpoint is."""
        from model_runner.quant.checkpoint_quant import default_quant

        if self.cpu_planes:
            return self._quantized(out_features, in_features, self.quantization,
                                   self.int4_max_rows)  # fmt: skip
        quant = self.checkpoint or self.float_layout or default_quant(self.quantization)
        quantize_floats = self.checkpoint is None
        args = (self.dtype, self.device, self.dense, quantize_floats)
        if self.quantization == "fp8":
            from model_runner.quant.fp8_linear import Fp8Linear

            return Fp8Linear(out_features, in_features, *args)
        from model_runner.quant.w4a16_linear import W4A16Linear

        return W4A16Linear(out_features, in_features, quant, *args)

    def _quantized(self, out_features: int, in_features: int, mode: str, max_rows):
        from model_runner.quant.quantized_linear import QuantizedLinear

        return QuantizedLinear(out_features, in_features, mode, self.dtype, max_rows,
                               self.dense, self.kernel)  # fmt: skip

    def linear(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> Linear:
        method = self.method(sum(output_sizes), in_features)
        return Linear(in_features, output_sizes, method, bias, self.dtype, self.device)

    def row_parallel_linear(self, in_features: int, output_sizes: Sequence[int]) -> Linear:
        """A projection over this rank's slice of the inputs, summed over ranks (plain when
        there is one rank)."""
        if self.tp is None or not self.tp.enabled:
            return self.linear(in_features, output_sizes)
        method = RowParallelLinear(self.method(sum(output_sizes), in_features), self.tp)
        return Linear(in_features, output_sizes, method, False, self.dtype, self.device)

    def lm_head(self, hidden_size: int, vocab_size: int) -> Linear:
        """Dense, or quantized with a dense copy (see the module)."""
        if self.lm_head_max_rows > 0:
            mode = "gguf" if self.quantization == "gguf" else "int8"
            method = self._quantized(vocab_size, hidden_size, mode, self.lm_head_max_rows)
        else:
            method = DenseLinear(vocab_size, hidden_size, self.dtype, self.device, self.dense)
        return Linear(hidden_size, [vocab_size], method, False, self.dtype, self.device)


# Below 8 rows library-packed GEMMs are no faster than plain ones.
MIN_PACKED_BATCH = 8


def projection_shapes(mc) -> list[tuple[int, int]]:
    """[out, in] of one decoder layer's projections (qkv, o, gate_up, down)."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    h, i = mc.hidden_size, mc.intermediate_size
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


def plan_linears(
    config,
    device: torch.device,
    dtype: torch.dtype,
    source_format: str,
    gguf_types,
    model_config,
    available_bytes: int,
    checkpoint=None,
) -> LinearPlan:
    """The LinearPlan of one load: quantization, CPU layouts, and what memory allows.

    Library-packed copies (about 1.3x the dense weights) are kept only when they fit in half
    of the available memory; likewise the quantized methods' dense bf16 copies (2 bytes per
    weight, so 4-bit planes plus their copy take ~1.31x the bf16 weights).
    """
    quant = resolve_quantization(
        config.quantization, device, dtype, source_format, gguf_types, checkpoint
    )
    float_layout = None
    if source_format == "dummy" and checkpoint is not None:
        # NOTE: no stored tensors: the random floats are quantized in the config's layout
        float_layout, checkpoint = checkpoint, None
    shapes = projection_shapes(model_config)
    weights = model_config.num_layers * sum(o * i for o, i in shapes)
    weights += model_config.vocab_size * model_config.hidden_size
    dense = _dense_options(config, device, dtype, weights, available_bytes, model_config)
    cpu_quant = quant if quant in CPU_ONLY else "none"  # NOTE: the CPU kernels' planning
    if _fits_cpu_planes(checkpoint, quant, device, dtype):
        cpu_quant = quant
    kernel = _quant_kernel(config, cpu_quant, device)
    if cpu_quant in CHECKPOINT_FORMATS and kernel != "int8-dot":
        cpu_quant = "none"  # NOTE: torch's int4 GEMM would round the scales to bf16
    _warn_if_slow(cpu_quant, kernel, dtype)
    copy_too_big = 2 * weights > available_bytes // 2
    max_rows = _int4_max_rows(config, cpu_quant, kernel, shapes, copy_too_big)
    lm_rows = _lm_head_max_rows(config, cpu_quant, kernel, model_config)
    log.info(
        "linear layers: %s%s%s",
        quant,
        "" if cpu_quant == "none" else f", {kernel} kernel",
        "" if max_rows is None else f" up to {max_rows} rows, dense bf16 above",
    )
    if lm_rows:
        log.info("LM head: quantized (%s) up to %d rows, dense bf16 above", kernel, lm_rows)
    cpu_planes = cpu_quant in CHECKPOINT_FORMATS
    return LinearPlan(dtype, device, quant, dense, max_rows, kernel, lm_rows,
                      checkpoint=checkpoint, cpu_planes=cpu_planes,
                      float_layout=float_layout)  # fmt: skip


def _dense_options(config, device, dtype, weights: int, available_bytes: int,
                   model_config) -> DenseOptions:  # fmt: skip
    """The dense layout: transposed float32 on the CPU, and library-packed copies (about
    1.3x the dense weights) only where they fit in half the available memory and agree
    with F.linear."""
    from kernels.linear import packing_available

    elem = torch.empty((), dtype=dtype).element_size()
    pack = min(config.cpu_packed_batch, config.max_num_seqs) if device.type == "cpu" else 0
    if pack < MIN_PACKED_BATCH or not packing_available(dtype):
        pack = 0
    elif 1.3 * weights * elem > available_bytes // 2:
        log.warning("packed GEMM weights skipped: too little free memory")
        pack = 0
    transpose = device.type == "cpu" and dtype == torch.float32
    if pack and not _packing_works(dtype, DenseOptions(transpose, pack), model_config.hidden_size):
        log.warning("the packed GEMM disagrees with F.linear here: packing turned off")
        pack = 0
    return DenseOptions(transpose=transpose, pack_batch=pack)


def _fits_cpu_planes(checkpoint, quant: str, device: torch.device, dtype: torch.dtype) -> bool:
    """An AWQ/GPTQ 4-bit checkpoint the CPU's quantized kernels can take exactly (no act-order;
    bfloat16 activations, as for GGUF: float32 stays the exact mode)."""
    return (
        checkpoint is not None
        and quant == checkpoint.method in ("awq", "gptq")
        and checkpoint.bits == 4
        and not checkpoint.desc_act
        and checkpoint.group_size > 0
        and device.type == "cpu"
        and dtype == torch.bfloat16
    )


def _quant_kernel(config, quant: str, device: torch.device) -> str:
    """The quantized methods' kernel: `--cpu-quant-kernel`, `auto` = int8-dot where it runs."""
    requested = config.cpu_quant_kernel
    if requested not in CPU_QUANT_KERNELS:
        raise QuantizationError(f"unknown --cpu-quant-kernel {requested!r}: {CPU_QUANT_KERNELS}")
    if quant == "none" or device.type != "cpu" or requested == "int4":
        return "int4"
    from kernels import int8_dot_linear

    if int8_dot_linear.available(kernel_build_dir()):
        return "int8-dot"
    if requested == "int8-dot":
        raise QuantizationError(
            "--cpu-quant-kernel int8-dot: the kernels do not run here (they need AVX-512 VNNI "
            "and a C++ compiler; the log says which is missing)"
        )
    return "int4"


def _lm_head_max_rows(config, quant: str, kernel: str, model_config) -> int:
    """Rows up to which the LM head is quantized (0: dense); see the module."""
    if quant == "none" or kernel != "int8-dot" or config.batch_invariant:
        return 0
    from model_runner.cpu_profile import quantized_max_rows

    shape = (min(model_config.vocab_size, LM_HEAD_PROBE_ROWS), model_config.hidden_size)
    return quantized_max_rows([shape], "q8")


# The LM head's crossover is measured on at most this many vocabulary rows (its cost per
# row is what matters, and a 128k x 4096 probe would take seconds and gigabytes).
LM_HEAD_PROBE_ROWS = 32768


def _int4_max_rows(config, quant: str, kernel: str, shapes, copy_too_big: bool) -> int | None:
    """Steps of up to this many rows take the 4-bit GEMM, larger ones the dense copy; None:
    no dense copy (every step 4-bit). Checked for memory before anything is measured."""
    if quant == "none":
        return None
    if config.cpu_int4_max_rows is not None and config.cpu_int4_max_rows < 0:
        return None
    if config.batch_invariant and config.cpu_int4_max_rows is None:
        return None  # NOTE: one kernel for all rows
    if copy_too_big:
        log.warning("no dense copy of the quantized weights: too little free memory")
        return None
    if config.cpu_int4_max_rows is not None:
        return config.cpu_int4_max_rows
    from model_runner.cpu_profile import quantized_max_rows

    return quantized_max_rows(shapes, "q4" if kernel == "int8-dot" else "int4")


def _packing_works(dtype: torch.dtype, options: DenseOptions, size: int) -> bool:
    """Self-check of the library's packed GEMM on one random [size, size] weight, before any
    model weight is packed (a library that disagrees with F.linear is not used)."""
    weight = torch.randn(size, size).to(dtype)
    probe = DenseLinear(size, size, dtype, torch.device("cpu"), options, weight=weight)
    probe.finalize()
    return probe.packing_works()
