"""Kernel tests: the Triton kernels run natively on CUDA, else in Triton's CPU interpreter.

Without CUDA this sets `TRITON_INTERPRET=1` for the process, before the Triton kernel
modules are imported (the variable is read when `@triton.jit` decorates a function, and again
by the interpreter at run time, so it stays set). That leaves other test folders' behaviour
unchanged: `kernels.ops` only picks Triton for CUDA tensors or under `TOKENMILL_KERNELS=triton`,
where on a CPU the interpreter is exactly what is needed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _forget_jit_modules() -> None:
    """Drop Triton's Python modules (not its C extension) and ours, so they re-decorate."""
    for name in list(sys.modules):
        triton_py = (name == "triton" or name.startswith("triton.")) and not name.startswith(
            "triton._C"
        )
        if triton_py or (name.startswith("kernels.") and name.endswith("_triton")):
            del sys.modules[name]


def _enable_interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    standard = sys.modules.get("triton.language.standard")
    if standard is not None:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(standard.cdiv, InterpretedFunction):
            # NOTE: Triton was imported earlier in this process without the interpreter.
            _forget_jit_modules()


if DEVICE == "cpu":
    _enable_interpreter()


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _no_forced_kernels(monkeypatch):
    """Tests pick their implementation explicitly; an outer TOKENMILL_KERNELS must not leak in."""
    monkeypatch.delenv("TOKENMILL_KERNELS", raising=False)
