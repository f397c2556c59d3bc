"""Engine memory under soak-like offline traffic: RSS against glibc's heap in use and free.

Tells a per-request leak from a shape-keyed cache: with `--fixed-shapes` every round of
requests has the same prompt length and output length (so every step has a shape seen
before); without it prompt lengths vary as in `soak.py`. A leak grows the heap in use in
both modes; a cache keyed by step shapes (oneDNN primitives and the like) only in the second.

    python load_tests/engine_memory_probe.py --duration 300 [--fixed-shapes] [--grammar]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.offline import LLM  # noqa: E402
from model_runner.sampling_params import GrammarSpec, SamplingParams  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while many small birds sing".split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def batch(rng: random.Random, args) -> tuple[list[str], list[SamplingParams]]:
    prefix = " ".join(WORDS[i % len(WORDS)] for i in range(400))
    grammar = GrammarSpec(kind="json_schema", spec=json.dumps(SCHEMA))
    prompts, params = [], []
    for _ in range(args.batch):
        length = 150 if args.fixed_shapes else rng.randrange(5, 300)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        if not args.fixed_shapes and rng.random() < 0.3:
            text = prefix + " " + text
        use_grammar = args.grammar and rng.random() < 0.15
        prompts.append(text)
        params.append(SamplingParams(
            max_tokens=16 if args.fixed_shapes else rng.randrange(8, 48), temperature=0.8,
            grammar=grammar if use_grammar else None))  # fmt: skip
    return prompts, params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--fixed-shapes", action="store_true")
    p.add_argument("--grammar", action="store_true", help="15%% of requests with a JSON schema")
    args = p.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    llm = LLM(max_model_len=2048, kv_cache_memory=0.5, use_tqdm=False)
    rng, start, last, done = random.Random(0), time.time(), -1e9, 0
    while time.time() - start < args.duration:
        llm.generate(*batch(rng, args))
        done += args.batch
        if (t := time.time() - start) - last >= args.interval:
            last, m = t, libc.mallinfo2()
            print(f"t={t:5.0f}s requests={done:5d} rss={rss_mib():7.1f} MiB "
                  f"heap in use={m.uordblks / 2**20:7.1f} free={m.fordblks / 2**20:6.1f} "
                  f"mmapped={m.hblkhd / 2**20:6.1f} python objects={len(gc.get_objects())}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
