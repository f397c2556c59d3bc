"""The CPU engine process reuses freed activation memory instead of faulting in new pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Like the engine process: settings first, then prefill steps of the default model in a
# worker thread; prints the page faults of the last two steps.
SCRIPT = """
import random, resource, sys
from concurrent.futures import ThreadPoolExecutor
from model_runner.cpu_malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
from model_runner.config import EngineConfig
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.step_input import NewSequence, ScheduledChunk, StepInput

SEQS, LEN = 16, 64
worker = ThreadPoolExecutor(1)
cfg = EngineConfig(dtype="float32", kv_cache_memory=0.1, max_model_len=256, max_num_seqs=SEQS)
runner = worker.submit(ModelRunner, cfg, False).result()
rng = random.Random(0)
sampling = SamplingParams(temperature=0.0, max_tokens=1)

def prefill(step):
    news = [
        NewSequence(
            seq_id=f"{step}-{i}",
            token_ids=[rng.randrange(100, 40000) for _ in range(LEN)],
            num_prompt_tokens=LEN,
            block_ids=list(range(i * 4, i * 4 + 4)),
            num_computed_tokens=0,
            sampling=sampling,
        )
        for i in range(SEQS)
    ]
    chunks = [ScheduledChunk(f"{step}-{i}", LEN, 4, []) for i in range(SEQS)]
    runner.execute(StepInput(step_id=step, new_sequences=news, chunks=chunks))

faults = []
for step in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker.submit(prefill, step).result()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-2:]))
"""


def prefill_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_steps_reuse_freed_activations():
    default, tuned = prefill_faults("default"), prefill_faults("tuned")
    assert default > 2_000  # glibc's defaults: fresh pages for a share of every step
    assert tuned < default / 10
