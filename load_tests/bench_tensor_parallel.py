"""Tensor parallelism on the CPU: decode step time at TP=1 and TP=N (gloo), and the share of
a TP=N step spent in collectives (all-reduce, all-gather, the token broadcast).

    python load_tests/bench_tensor_parallel.py                  # tiny-llama and a 135M shape
    python load_tests/bench_tensor_parallel.py --configs tiny-llama --batch-sizes 1 8

Each rank is a process running `ModelRunner` on synthetic steps (no scheduler, no HTTP):
one prefill of `--prompt-len` tokens per sequence, then `--decode-steps` decode steps of
the whole batch. TP=N ranks take one torch thread each (as the engine does); TP=1 is
measured with 1 thread and with N threads (the same cores as TP=N). Every run is eager
(`--enforce-eager`, float32), the path TP=N serves. Collective time includes waiting for
the slower rank, so it is what tensor parallelism costs a step on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# hidden 576, 8 heads, 2 KV heads: near the default model (SmolLM2-135M: 9 and 3), divisible
SMOL_TP_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 2,
    "num_hidden_layers": 30, "vocab_size": 49152, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def _config_path(name: str, folder: Path) -> str:
    if name != "smollm2-shape-8h":
        return name
    path = folder / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SMOL_TP_SHAPE))
    return str(path)


def _time_collectives(tp, totals: dict[str, float]) -> None:
    """Wrap the rank's collectives so that their wall time adds up in `totals`."""
    for name in ("all_reduce", "all_gather_last_dim", "broadcast_tokens"):
        method = getattr(tp, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                totals["collectives"] += time.perf_counter() - start

        setattr(tp, name, timed)


def run_rank(args) -> dict | None:
    """One rank's runner through the synthetic steps; rank 0 returns the timings."""
    import torch

    from model_runner.config import EngineConfig
    from model_runner.parallel import RankPlacement
    from model_runner.runner import ModelRunner
    from model_runner.sampling_params import SamplingParams
    from model_runner.step_input import NewSequence, ScheduledChunk, StepInput

    if args.world == 1:
        torch.set_num_threads(args.threads)
    config = EngineConfig(load_format="dummy", hf_config_path=args.config, dtype="float32",
                          enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
                          max_num_seqs=max(args.batch_sizes), kv_cache_memory=0.5,
                          tensor_parallel_size=args.world, async_scheduling=False)  # fmt: skip
    placement = RankPlacement(args.rank, args.world, args.run_dir)
    runner = ModelRunner(config, progress=False, placement=placement)
    totals = {"collectives": 0.0}
    _time_collectives(runner.tp, totals)
    greedy = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    per_seq = -(-(args.prompt_len + args.decode_steps + 4) // runner.block_size)
    results, step_id = {}, 0
    for batch in args.batch_sizes:
        ids = [f"b{batch}-{i}" for i in range(batch)]
        prompt = [(7 * t) % 1000 + 3 for t in range(args.prompt_len)]
        news = [NewSequence(seq_id=sid, token_ids=[i + 3, *prompt[1:]],
                            num_prompt_tokens=args.prompt_len, num_computed_tokens=0,
                            block_ids=list(range(i * per_seq, (i + 1) * per_seq)), sampling=greedy)
                for i, sid in enumerate(ids)]  # fmt: skip
        prefill = [ScheduledChunk(sid, args.prompt_len, per_seq, []) for sid in ids]
        runner.execute(StepInput(step_id=step_id, new_sequences=news, chunks=prefill))
        step_id += 1
        times, shares = [], []
        for n in range(args.decode_steps):
            totals["collectives"] = 0.0
            start = time.perf_counter()
            decode = [ScheduledChunk(sid, 1, per_seq, []) for sid in ids]
            runner.execute(StepInput(step_id=step_id, chunks=decode))
            step_id += 1
            if n >= args.warmup:
                elapsed = time.perf_counter() - start
                times.append(elapsed)
                shares.append(totals["collectives"] / elapsed)
        runner.execute(StepInput(step_id=step_id, finished_seq_ids=ids))
        step_id += 1
        results[batch] = {"step_ms": 1000 * statistics.median(times),
                          "collective_share": statistics.median(shares)}  # fmt: skip
    return results if args.rank == 0 else None


def measure(config: str, world: int, threads: int, args, folder: Path) -> dict:
    """Run the ranks as processes; rank 0's JSON timings."""
    run_dir = tempfile.mkdtemp(dir=folder)
    base = [sys.executable, __file__, "--rank-of", str(world), "--run-dir", run_dir,
            "--config", config, "--threads", str(threads), "--prompt-len", str(args.prompt_len),
            "--decode-steps", str(args.decode_steps), "--warmup", str(args.warmup),
            "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
    procs = [subprocess.Popen([*base, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
             for r in range(world)]  # fmt: skip
    out = procs[0].communicate()[0]
    for proc in procs[1:]:
        proc.wait()
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny-llama", "smollm2-shape-8h"])
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    # one rank of a measurement (the script starts these itself)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank-of", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        args.world = args.rank_of
        results = run_rank(args)
        if results is not None:
            print(json.dumps(results))
        return
    n = args.tensor_parallel_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"| config | batch | TP=1, 1 thread (ms) | TP=1, {n} threads (ms) | TP={n} (ms) | "
              f"collectives, share of a TP={n} step |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name in args.configs:
            config = _config_path(name, folder)
            one = measure(config, 1, 1, args, folder)
            one_n = measure(config, 1, n, args, folder)
            tp = measure(config, n, 1, args, folder)
            for b in args.batch_sizes:
                cells = [one[b]["step_ms"], one_n[b]["step_ms"], tp[b]["step_ms"]]
                share = 100 * tp[b]["collective_share"]
                print(f"| {name} | {b} | " + " | ".join(f"{c:.2f}" for c in cells)
                      + f" | {share:.0f}% |")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
