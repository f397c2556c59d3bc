"""Multi-LoRA on the device: adapter slots beside each target projection, mixed in one step.

Each targeted fused projection (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) holds
`--max-loras` slots: `a [S, shards * R, in]` and `b [S, shards * R, out]`, R =
`--max-lora-rank`. Shard i of slot s keeps its adapter's A in rows [i*R, i*R + r) of a[s]
and B.T in the same rows of b[s], columns of shard i only; everything else is zero, so one
shrink and one expand per projection serve q/k/v (or gate/up) and every rank at once.
The step carries one slot per token (-1: no adapter); `LoraContext.token_slots` holds it
for the forward, None when no row of the step has an adapter (the base path, untouched).

Which adapter sits in which slot is the scheduler's decision (`StepInput.lora_loads`, applied
before the step's forward); a slot is only rewritten when no live sequence uses it. Host
copies of adapters are kept LRU, `--max-cpu-loras` of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from kernels import ops
from kernels.lora import lora_add_dense, lora_slot_weights
from model_runner.linear import Linear
from model_runner.lora_adapter import TARGETS, BaseShapes, LoraAdapter, read_adapter
from model_runner.step_upload import to_device

# Fused projection -> its peft module names, in shard order
_SHARDS: dict[str, list[str]] = {}
for _module, (_proj, _shard) in TARGETS.items():
    _SHARDS.setdefault(_proj, []).insert(_shard, _module)


class LoraContext:
    """The step's token slots, shared by every projection with adapters (set by the runner
    around one forward; None: no adapter rows this step), and on the CPU their per-slot
    weights (`kernels.lora.lora_slot_weights`), built once for every projection."""

    def __init__(self, scales: torch.Tensor) -> None:
        self.scales = scales
        self.token_slots: torch.Tensor | None = None
        self.slot_weights: torch.Tensor | None = None

    def set(self, token_slots: torch.Tensor | None) -> None:
        self.token_slots = token_slots
        cpu = token_slots is not None and not ops.use_triton(token_slots)
        self.slot_weights = lora_slot_weights(token_slots, self.scales) if cpu else None


class LoraStacks:
    """One fused projection's adapter slots (see the module)."""

    def __init__(self, linear: Linear, modules: list[str], num_slots: int, max_rank: int,
                 scales: torch.Tensor, context: LoraContext, dtype: torch.dtype,
                 device: torch.device):  # fmt: skip
        self.modules, self.max_rank = modules, max_rank
        self.offsets, self.sizes = linear.offsets, linear.output_sizes
        rows = len(modules) * max_rank
        self.a = torch.zeros(num_slots, rows, linear.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, rows, linear.out_features, dtype=dtype, device=device)
        self.scales, self.context = scales, context

    def write(self, slot: int, adapter: LoraAdapter | None, layer: int) -> None:
        """Put `adapter`'s weights for `layer` into `slot` (None: clear it)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if adapter is None:
            return
        for i, module in enumerate(self.modules):
            pair = adapter.weights.get((layer, module))
            if pair is None:
                continue
            a, b = pair
            rows = slice(i * self.max_rank, i * self.max_rank + adapter.rank)
            cols = slice(self.offsets[i], self.offsets[i] + self.sizes[i])
            self.a[slot, rows] = a.to(self.a.dtype)
            self.b[slot, rows, cols] = b.t().to(self.b.dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += each token's adapter delta (the context's token slots)."""
        slots = self.context.token_slots
        if slots is None:
            return y
        if x.dtype != self.a.dtype:
            x = x.to(self.a.dtype)
        if self.context.slot_weights is not None:
            lora_add_dense(y, x, self.a, self.b, self.context.slot_weights)
            return y
        h = ops.lora_shrink(x, self.a, slots)
        ops.lora_expand(y, h, self.b, slots, self.scales)
        return y


class LoraSlots:
    """The runner's adapters: device slots in every target projection and the host cache."""

    def __init__(self, layers: Sequence[torch.nn.Module], num_slots: int, max_rank: int,
                 max_cpu_loras: int, dtype: torch.dtype, device: torch.device):  # fmt: skip
        self.num_slots, self.max_rank, self.max_cpu_loras = num_slots, max_rank, max_cpu_loras
        self.device = device
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.context = LoraContext(self.scales)
        self.stacks: list[tuple[int, LoraStacks]] = []
        modules: dict[str, tuple[int, int]] = {}
        for index, layer in enumerate(layers):
            for proj, names in _SHARDS.items():
                linear: Linear = getattr(layer, proj)
                stacks = LoraStacks(linear, names, num_slots, max_rank, self.scales,
                                    self.context, dtype, device)  # fmt: skip
                linear.lora = stacks
                self.stacks.append((index, stacks))
                for i, name in enumerate(names):
                    modules[name] = (linear.in_features, linear.output_sizes[i])
        self.base = BaseShapes(num_layers=len(layers), modules=modules)
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.slot_keys: list[str | None] = [None] * num_slots

    def read(self, key: str, path: str) -> LoraAdapter:
        """The adapter `key` from the host cache, or read (and checked) from `path`."""
        adapter = self._host.get(key)
        if adapter is None:
            adapter = read_adapter(path, self.base, self.max_rank)
            self._host[key] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self._host.move_to_end(key)
        return adapter

    def load(self, slot: int, key: str, path: str) -> None:
        """Make `slot` hold adapter `key` (its scale too)."""
        if self.slot_keys[slot] == key:
            return
        adapter = self.read(key, path)
        for layer, stacks in self.stacks:
            stacks.write(slot, adapter, layer)
        self.scales[slot] = adapter.scale
        self.slot_keys[slot] = key

    def token_slots(self, per_chunk: Sequence[tuple[int, int]]) -> torch.Tensor | None:
        """[T] slots of the step's tokens from (slot, tokens) per chunk; None if no adapter."""
        if all(slot < 0 for slot, _ in per_chunk):
            return None
        flat = [slot for slot, n in per_chunk for _ in range(n)]
        return to_device(flat, torch.long, self.device)


def check_lora_config(config) -> None:
    """The LoRA flags alone (no model needed); raises EngineConfigError naming the flag."""
    from model_runner.config import EngineConfigError

    if not config.enable_lora:
        if config.lora_modules:
            raise EngineConfigError("--lora-modules needs --enable-lora")
        return
    if not 1 <= config.max_lora_rank <= 512:
        raise EngineConfigError(f"--max-lora-rank {config.max_lora_rank}: must be 1..512")
    if config.max_loras < 1:
        raise EngineConfigError(f"--max-loras {config.max_loras}: must be at least 1")
    cpu = config.max_cpu_loras
    if cpu is not None and cpu < config.max_loras:
        raise EngineConfigError(f"--max-cpu-loras {cpu} is below --max-loras {config.max_loras}")
    if config.batch_invariant:
        raise EngineConfigError(
            "--enable-lora with --batch-invariant is not supported: the adapters' GEMMs "
            "span the batch; drop one of the two flags"
        )
    names = [name for name, _ in config.lora_modules]
    served = config.served_model_name or ""
    for name in names:
        if not name or names.count(name) > 1 or name == served:
            raise EngineConfigError(
                f"--lora-modules: the adapter name {name!r} is empty, repeated or the base "
                "model's; give each adapter its own name"
            )


def make_lora_slots(config, layers, dtype: torch.dtype, device: torch.device) -> LoraSlots | None:
    """The runner's adapter slots (None without --enable-lora), with every --lora-modules
    adapter read and checked: a bad one is a start-up error naming it."""
    from model_runner.config import EngineConfigError
    from model_runner.lora_adapter import LoraAdapterError
    from model_runner.step_input import lora_key

    check_lora_config(config)
    if not config.enable_lora:
        return None
    slots = LoraSlots(
        layers, config.max_loras, config.max_lora_rank,
        config.max_cpu_loras or config.max_loras, dtype, device,
    )  # fmt: skip
    for name, path in config.lora_modules:
        try:
            slots.read(lora_key(name, 0), path)
        except LoraAdapterError as e:
            raise EngineConfigError(f"--lora-modules {name}={path}: {e}") from None
    return slots
