"""Multi-LoRA benchmark: output tok/s with no adapter vs four adapters spread over requests.

    python load_tests/bench_lora.py --rounds 2 --json-out lora.json

Writes four random rank-16 PEFT adapters (every target: q/k/v/o, gate/up/down) for the
default model into a temporary folder, serves them from one tokenmill server
(`--enable-lora --max-loras 4 --allow-runtime-lora-updating`, otherwise the default mode),
and alternates, per round, bench_serving runs at concurrency 32 (64 requests, 64-token
prompts, 64 output tokens, `ignore_eos`) against the base model and against the four
adapters in turn. Then it loads a fifth adapter at runtime and reports how long
`POST /v1/load_lora_adapter` took. The issue's target: adapters >= 75% of the base tok/s.
Any bench_serving.py flag may be added (e.g. --concurrency 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402

DEFAULTS = ["--concurrency", "32", "--num-requests", "64", "--input-len", "64",
            "--output-len", "64"]  # fmt: skip
RANK = 16


def model_shapes() -> tuple[int, dict[str, tuple[int, int]]]:
    """The default model's layer count and (in, out) features of each LoRA target."""
    from model_runner.config import EngineConfig
    from model_runner.gguf_loader import open_gguf
    from model_runner.model_source import resolve_model
    from model_runner.runner import load_model_config

    source = resolve_model(EngineConfig())
    cfg = load_model_config(source, open_gguf(source.path))
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}  # fmt: skip
    return cfg.num_layers, shapes


def write_adapter(folder: Path, seed: int, layers: int, shapes: dict) -> str:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            weights[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.02
            weights[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": list(shapes), "bias": "none"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def tok_s(base_url: str, model: str, extra: list[str]) -> float:
    args = DEFAULTS + ["--base-url", base_url, "--model", model] + extra
    return bench_serving.main(args)[0]["output_throughput"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8310)
    p.add_argument("--json-out", default=None)
    args, extra = p.parse_known_args()
    layers, shapes = model_shapes()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f"lora{i}": write_adapter(Path(tmp) / f"lora{i}", i, layers, shapes)
                 for i in range(5)}  # fmt: skip
        modules = [f"{n}={paths[n]}" for n in ("lora0", "lora1", "lora2", "lora3")]
        flags = ["--enable-lora", "--max-loras", "4", "--allow-runtime-lora-updating",
                 "--lora-modules", *modules]  # fmt: skip
        rounds = []
        with running(tokenmill_cmd(args.port, *flags), args.port, "tokenmill") as url:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            for r in range(args.rounds):
                base = tok_s(url, model, extra)
                adapters = tok_s(url, "lora0,lora1,lora2,lora3", extra)
                rounds.append({"base": base, "adapters": adapters, "ratio": adapters / base})
                print(f"round {r + 1}: base {base:.1f} tok/s, four adapters {adapters:.1f} "
                      f"tok/s ({adapters / base:.0%})\n")  # fmt: skip
            start = time.perf_counter()
            body = {"lora_name": "lora4", "lora_path": paths["lora4"]}
            resp = httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60)
            load_ms = (time.perf_counter() - start) * 1000
            resp.raise_for_status()
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"four adapters / base (median): {ratio:.0%} (target >= 75%); runtime load of "
          f"one adapter: {load_ms:.0f} ms")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"rounds": rounds, "ratio": ratio, "load_ms": load_ms}, indent=2)
        )


if __name__ == "__main__":
    main()
