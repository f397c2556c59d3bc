"""Multi-LoRA bookkeeping: which adapters may be asked for, and which sits in which slot.

The runner has `--max-loras` adapter slots (model_runner/lora.py); this is their pure-Python
map. A sequence is admitted only when its adapter is resident or can be made resident: a
free slot, else the least recently used slot no running sequence's adapter holds. So at most
`--max-loras` distinct adapters are in any step, and a slot is only refilled once nothing
running uses it. A refill travels in the next StepInput (`lora_loads`), applied before that
step's forward; steps run in order, so a step in flight still sees the slot's old adapter.

Adapters are keyed by name and load generation (`lora_key`): one unloaded and loaded again
under the same name is another key, so it never shares the old one's slot or cached blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

from model_runner.step_input import LoraLoad, lora_key


class LoraRegistry:
    def __init__(self, num_slots: int, modules: Iterable[tuple[str, str]] = ()) -> None:
        self.adapters: dict[str, tuple[str, str]] = {}  # servable name -> (key, path)
        for name, path in modules:
            self.adapters[name] = (lora_key(name, 0), path)
        self._generation = 0
        self.slot_keys: list[str | None] = [None] * num_slots
        self._slot_paths: list[str] = [""] * num_slots
        self._last_used = [0] * num_slots
        self._clock = 0
        self._loads: list[LoraLoad] = []

    # --- names -------------------------------------------------------------------------

    def lookup(self, name: str) -> tuple[str, str] | None:
        """(key, path) of a servable adapter, None if unknown or unloaded."""
        return self.adapters.get(name)

    def next_key(self, name: str) -> str:
        """The key a new load of `name` gets."""
        self._generation += 1
        return lora_key(name, self._generation)

    def register(self, name: str, key: str, path: str) -> None:
        self.adapters[name] = (key, path)

    def unregister(self, name: str) -> bool:
        """New requests for `name` are refused; running ones finish on its slot."""
        return self.adapters.pop(name, None) is not None

    # --- slots -------------------------------------------------------------------------

    def pick(self, key: str, in_use: set[str]) -> int | None:
        """The slot `key` would take (already there, free, or LRU unused), None if none."""
        if key in self.slot_keys:
            return self.slot_keys.index(key)
        free = [s for s, k in enumerate(self.slot_keys) if k is None]
        if free:
            return free[0]
        idle = [s for s, k in enumerate(self.slot_keys) if k not in in_use]
        return min(idle, key=self._last_used.__getitem__) if idle else None

    def assign(self, slot: int, key: str, path: str) -> None:
        """Put `key` in `slot` (from pick); queues the load if it is not there yet."""
        if self.slot_keys[slot] != key:
            self.slot_keys[slot], self._slot_paths[slot] = key, path
            self._loads = [x for x in self._loads if x.slot != slot]
            self._loads.append(LoraLoad(slot=slot, key=key, path=path))
        self._clock += 1
        self._last_used[slot] = self._clock

    def resend_loads(self) -> None:
        """A step failed, maybe before its loads: send every slot's load again (the runner
        skips a slot that already holds its key)."""
        self._loads = [
            LoraLoad(slot=s, key=k, path=self._slot_paths[s])
            for s, k in enumerate(self.slot_keys)
            if k is not None
        ]

    def take_loads(self) -> list[LoraLoad]:
        loads, self._loads = self._loads, []
        return loads
