"""Time (and optionally profile) one model-runner decode step at a given batch.

    python load_tests/profile_step.py --dtype float32 --seqs 32 --context 100 [--profile]

Prefills `--seqs` random prompts of `--context` tokens, then times decode steps of one
token per sequence through `ModelRunner.execute`, and a plain HF-style forward baseline
(the same model's forward on the same tokens, without the step's bookkeeping).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.wiring import prepare_engine_process  # noqa: E402
from model_runner.config import EngineConfig  # noqa: E402
from model_runner.runner import ModelRunner  # noqa: E402
from model_runner.sampling_params import SamplingParams  # noqa: E402
from model_runner.step_input import NewSequence, ScheduledChunk, StepInput  # noqa: E402


class Bench:
    """Drives `seqs` sequences: one prefill step, then decode steps (blocks pre-assigned)."""

    def __init__(
        self, runner: ModelRunner, seqs: int, context: int, steps: int, sampling: SamplingParams
    ):
        self.runner = runner
        bs = runner.block_size
        per_seq = -(-(context + steps + 1) // bs)
        rng = random.Random(0)
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
        self.lens = [context] * seqs
        news = [
            NewSequence(
                seq_id=str(i),
                token_ids=[rng.randrange(100, 40000) for _ in range(context)],
                num_prompt_tokens=context,
                block_ids=self.tables[i],
                num_computed_tokens=0,
                sampling=sampling,
            )
            for i in range(seqs)
        ]
        chunks = [ScheduledChunk(str(i), context, per_seq, []) for i in range(seqs)]
        runner.execute(StepInput(step_id=0, new_sequences=news, chunks=chunks))
        self.step_id = 1

    def decode(self) -> float:
        n = len(self.tables)
        chunks = [ScheduledChunk(str(i), 1, len(self.tables[i]), []) for i in range(n)]
        start = time.perf_counter()
        self.runner.execute(StepInput(step_id=self.step_id, chunks=chunks))
        self.step_id += 1
        return time.perf_counter() - start


def plain_forward_ms(runner: ModelRunner, seqs: int, repeats: int = 5) -> float:
    """The model's matmuls alone: a [seqs, hidden] pass through every weight (no attention)."""
    model = runner.model
    x = torch.randn(seqs, runner.model_config.hidden_size, dtype=runner.dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            h = x
            for layer in model.layers:
                qkv = layer.qkv_proj(h)
                h = h + layer.o_proj(qkv[:, : layer.q_size])
                gu = layer.gate_up_proj(h)
                h = h + layer.down_proj(gu[:, : gu.shape[1] // 2])
            model.lm_head(h)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def hf_forward_ms(runner: ModelRunner, seqs: int, repeats: int = 5) -> float:
    """A plain HF transformers forward of `seqs` tokens (batch [seqs, 1], no KV cache)."""
    from transformers import AutoModelForCausalLM

    path = runner.source.path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    model = model.to(runner.dtype).eval()
    ids = torch.randint(100, 40000, (seqs, 1))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--hf", action="store_true", help="also time a plain HF forward (GGUF only)")
    ap.add_argument("--profile", action="store_true", help="cProfile + torch.profiler tables")
    ap.add_argument("--enforce-eager", action="store_true", help="no compiled decode steps")
    args = ap.parse_args()
    config = EngineConfig(
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_memory=0.5,
        max_model_len=2048,
        enforce_eager=args.enforce_eager,
    )
    prepare_engine_process(config)  # as the engine process does (malloc settings on the CPU)
    runner = ModelRunner(config, progress=False)
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=10**6, ignore_eos=True
    )
    bench = Bench(runner, args.seqs, args.context, args.steps + 10, sampling)
    for _ in range(3):
        bench.decode()
    times = [bench.decode() for _ in range(args.steps)]
    print(
        f"{args.dtype}/{runner.linear_plan.quantization}: decode step of {args.seqs} seqs "
        f"@ ~{args.context} ctx: "
        f"median {1000 * statistics.median(times):.1f} ms, min {1000 * min(times):.1f} ms; "
        f"matmuls alone {plain_forward_ms(runner, args.seqs):.1f} ms"
    )
    if args.hf:
        print(f"HF forward of {args.seqs} tokens: {hf_forward_ms(runner, args.seqs):.1f} ms")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [bench.decode() for _ in range(3)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        with torch.profiler.profile() as prof:
            bench.decode()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
