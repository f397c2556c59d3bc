"""load_tests/bench_kernels.py imports, parses its arguments, and refuses to run without CUDA."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

PATH = pathlib.Path(__file__).resolve().parents[2] / "load_tests" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NOTE: dataclasses look their module up while decorating
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_parse_args(bench):
    args = bench.parse_args(["--only", "decode,prefill", "--reps", "7", "--dtype", "float16"])
    assert args.only == {"decode", "prefill"} and args.reps == 7 and args.dtype == torch.float16
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nonsense"])


def test_causal_flops(bench):
    assert bench._causal_flops([2]) == 4 * 32 * 128 * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_exits_cleanly_without_cuda(bench, capsys):
    assert bench.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
