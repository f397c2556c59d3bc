"""The GPU suite's measurements that own the device, one per subprocess (so each frees its
memory on exit): `python load_tests/gpu_workers.py KIND JSON_ARGS` prints one JSON line.

- offline: `api.LLM` with token-id prompts, every request at once (req/s, output tok/s);
- decode_step: `ModelRunner` steps at a fixed context for each batch size (ms per step, the
  floor from a measured copy bandwidth, GPU idle share between step starts);
- hf: HF transformers' static padded `generate` on the same shapes.
Sizes come from the caller; on the CPU (`--dry-run`) they are tiny.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def offline(a: dict) -> dict:
    """Each workload {name, n, input_len, output_len or output_lens} through one LLM."""
    from api import LLM, SamplingParams

    llm = LLM(use_tqdm=False, **a["engine"])
    vocab = llm.engine.vocab_size
    out = {}
    try:
        llm.generate([{"prompt_token_ids": [11, 12, 13]}], SamplingParams(max_tokens=4))
        for w in a["workloads"]:
            rng = random.Random(w["name"])
            ins = w.get("input_lens") or [w["input_len"]] * w["n"]
            outs = w.get("output_lens") or [w["output_len"]] * w["n"]
            prompts = [
                {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(n)]} for n in ins
            ]
            params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in outs]
            t0 = time.perf_counter()
            results = llm.generate(prompts, params)
            wall = time.perf_counter() - t0
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
            out[w["name"]] = {
                "requests": len(results),
                "seconds": wall,
                "req_per_s": len(results) / wall,
                "output_tok_per_s": tokens / wall,
                "output_tokens": tokens,
            }
    finally:
        llm.shutdown()
    return out


def decode_step(a: dict) -> dict:
    """ms per decode step at `context` tokens for each batch, eager and (unless the device
    has no graphs) with CUDA graphs; the floor is weight + KV bytes over copy bandwidth."""
    from model_runner.config import EngineConfig
    from model_runner.kv_cache import bytes_per_block
    from model_runner.runner import ModelRunner

    results = {}
    for mode in a["modes"]:
        cfg = EngineConfig(**a["engine"], enforce_eager=mode == "eager")
        runner = ModelRunner(cfg, progress=False)
        weights = weight_bytes(runner.model)
        bandwidth = copy_bandwidth(runner.device, a["copy_mib"])
        kv_token = bytes_per_block(runner.model_config, runner.block_size, runner.dtype)
        kv_token //= runner.block_size
        for batch in a["batches"]:
            r = time_decode(runner, batch, a["context"], a["steps"], a["prefill_tokens"])
            floor = (weights + batch * a["context"] * kv_token) / bandwidth
            r.update(floor_ms=floor * 1e3, of_floor=r["ms_per_step"] / (floor * 1e3))
            results[f"{mode}/b{batch}"] = r
        results[f"{mode}/copy_gb_per_s"] = bandwidth / 1e9
        results[f"{mode}/weight_gib"] = weights / 2**30
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every weight but the embedding table (rows only);
    quantized methods count their packed tensors, scales and zeros."""
    seen, total = set(), 0
    tensors = [p for n, p in model.named_parameters() if n != "embed_tokens"]
    for lin in model.linears():
        weight = getattr(lin.method, "weight", None)
        stored = [weight] if weight is not None else list(vars(lin.method).values())
        tensors += [t for t in stored if isinstance(t, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def time_decode(runner, batch: int, context: int, steps: int, prefill_tokens: int) -> dict:
    from model_runner.sampling_params import SamplingParams
    from model_runner.step_input import NewSequence, ScheduledChunk, StepInput

    bs = runner.block_size
    per_seq = -(-(context + steps + 8) // bs)
    sampling = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(batch, context, runner.vocab_size, batch)
    step_id = 0
    ids = [f"b{batch}-{i}" for i in range(batch)]
    per_step = max(1, prefill_tokens // context)
    for start in range(0, batch, per_step):  # prefill, several whole prompts a step
        group = range(start, min(start + per_step, batch))
        new = [
            NewSequence(
                seq_id=ids[i],
                token_ids=prompts[i],
                num_prompt_tokens=context,
                block_ids=list(range(i * per_seq, (i + 1) * per_seq)),
                num_computed_tokens=0,
                sampling=sampling,
            )
            for i in group
        ]
        chunks = [ScheduledChunk(ids[i], context, per_seq, []) for i in group]
        runner.execute(StepInput(step_id=step_id, new_sequences=new, chunks=chunks))
        step_id += 1
    decode = [ScheduledChunk(s, 1, per_seq, []) for s in ids]
    for _ in range(3):  # warm-up (graph capture or replay paths settle)
        runner.execute(StepInput(step_id=step_id, chunks=decode))
        step_id += 1
    sync(runner.device)
    device_s, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        device_s += runner.execute(StepInput(step_id=step_id, chunks=decode)).device_seconds
        step_id += 1
    wall = time.perf_counter() - t0
    runner.execute(StepInput(step_id=step_id, finished_seq_ids=ids))
    return {"ms_per_step": wall / steps * 1e3, "idle_share": max(0.0, 1 - device_s / wall)}


def hf(a: dict) -> dict:
    """HF transformers, random weights of the same config, static padded greedy generate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(a["device"])
    dtype = getattr(torch, a["dtype"])
    config = AutoConfig.from_pretrained(a["config_dir"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    out = {}
    for w in a["workloads"]:
        ids = torch.tensor(
            random_prompts(w["batch"], w["input_len"], config.vocab_size, 1), device=device
        )
        kw = {
            "max_new_tokens": w["output_len"],
            "min_new_tokens": w["output_len"],
            "do_sample": False,
            "pad_token_id": 0,
        }
        with torch.inference_mode():
            model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
            sync(device)
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            sync(device)
        wall = time.perf_counter() - t0
        tokens = (gen.shape[1] - ids.shape[1]) * gen.shape[0]
        out[w["name"]] = {
            "batch": w["batch"],
            "seconds": wall,
            "req_per_s": w["batch"] / wall,
            "output_tok_per_s": tokens / wall,
            "ms_per_step": wall / w["output_len"] * 1e3,
        }
    return out


KINDS = {"offline": offline, "decode_step": decode_step, "hf": hf}

if __name__ == "__main__":
    torch.manual_seed(0)
    result = KINDS[sys.argv[1]](json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
