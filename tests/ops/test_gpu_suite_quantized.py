"""The GPU suite's quantized stage (`load_tests/bench_quantized.py`, issue 19): the suite
script parses, the real run asks for TRT-LLM's shapes in each format, and the table puts
the figures beside TRT-LLM's with the FP8 target's verdict. (`--dry-run` of the stage runs
every format on the CPU in ~40 s: `gpu_suite.sh OUT --dry-run --quantized-budget-s 120`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "load_tests"))

import bench_quantized  # noqa: E402


def test_the_suite_script_parses():
    script = REPO / "load_tests" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "bench_quantized.py" in script.read_text()


def test_the_gpu_run_measures_trtllm_shapes_in_each_format():
    s = bench_quantized.sizes(dry=False)
    assert (s["config"], s["dtype"]) == ("llama-3.1-8b", "bfloat16")
    assert s["decode"] == (1000, 1000) and s["prefill"] == (2048, 128)
    quant = {}
    for mode in bench_quantized.MODES:
        (offline, step) = bench_quantized.worker_calls(s, mode)
        assert offline[0] == "offline" and step[0] == "decode_step"
        assert step[1]["batches"] == [1] and step[1]["modes"] == ["graphs"]
        assert offline[1]["engine"]["load_format"] == "dummy"
        quant[mode] = offline[1]["engine"].get("quantization")
    assert quant == {"bf16": None, "fp8": "fp8", "awq-4bit": "awq"}


def _result(decode: float) -> dict:
    return {"offline": {"decode_heavy": {"output_tok_per_s": decode},
                        "prefill_heavy": {"output_tok_per_s": 900.0}},
            "decode_step": {"graphs/b1": {"ms_per_step": 6.5}}}  # fmt: skip


def test_the_table_sits_beside_trtllm_with_the_target():
    data = {"dry_run": False, "sizes": bench_quantized.sizes(False),
            "results": {"bf16": _result(5000.0), "fp8": _result(7500.0),
                        "awq-4bit": {"error": "RuntimeError: boom"}}}  # fmt: skip
    text = bench_quantized.table(data)
    assert "decode-heavy 1000/1000 out tok/s" in text and "17744, 3538 tok/s" in text
    assert "| fp8 | 7500 | 900 | 6.50 | 1.50x |" in text
    assert "| awq-4bit | error: RuntimeError: boom" in text
    assert "(1.50x, met)" in text
    data["results"]["fp8"] = _result(6000.0)
    assert "(1.20x, not met)" in bench_quantized.table(data)
