"""A test hook: make chosen model steps raise, to prove that a step fault fails only that
step's requests, frees their KV blocks and leaves the engine serving.

`TOKENMILL_FAULT_AT_FORWARD=N[,M...]`: the N-th (1-based) step that runs the model raises
`InjectedFault` inside `ModelRunner.launch`, after the step's state updates and before the
forward. Unset (always, outside tests) it costs one integer increment per step.
"""

from __future__ import annotations

import os

FAULT_ENV = "TOKENMILL_FAULT_AT_FORWARD"


class InjectedFault(RuntimeError):
    pass


class ForwardFaults:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.at = frozenset(int(n) for n in spec.split(",") if n.strip())
        self.forwards = 0

    def check(self) -> None:
        self.forwards += 1
        if self.forwards in self.at:
            raise InjectedFault(f"fault injected at forward {self.forwards} ({FAULT_ENV})")
