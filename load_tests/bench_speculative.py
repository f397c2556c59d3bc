"""Speculative decoding benchmark: output tok/s with and without speculation.

    python load_tests/bench_speculative.py --rounds 6 --json-out spec.json
    python load_tests/bench_speculative.py --method draft_model --draft DRAFT.gguf --k 3
    python load_tests/bench_speculative.py --rounds 1 --server-args "--dtype float32"

One tokenmill server without speculation and one with
`--speculative-config '{"method": "ngram", "num_speculative_tokens": K}'` (default K=7;
`--method draft_model --draft PATH`: proposals from that draft model instead) stay up for
the whole run and serve in turn, never both at once. In each round, each workload and
concurrency runs on the one server, then at once on the other (the order alternates by
round), through bench_serving (chat, greedy): a repetitive workload (rewrite a given code
block with one change, quote a passage, return a JSON object unchanged; up to 96 output
tokens, ending where the model ends its answer) and free chat (bench_serving's synthetic
prompts, 96 output tokens), at concurrency 1 and 8. Reported: median output tok/s, the
speed-up (the median of the rounds' paired ratios, and their range), the acceptance rate
from the speculating server's spec_decode counters, and ITL p50.
Targets: >= 1.8x at c=1 on the repetitive workload; no slowdown beyond 5% on free chat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402

STACK = (
    "```python\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n"
    "        return self.items.pop()\n\n    def is_empty(self):\n"
    "        return len(self.items) == 0\n```"
)
# NOTE: what users send to be copied with an edit: fenced code blocks (the default model
# rewrites a one-line snippet into other code), a quoted passage, a JSON object.
REPETITIVE = [
    f"{STACK}\nRewrite this class with the method `is_empty` renamed to `empty`. Keep "
    "everything else exactly the same.",
    f"Here is my code:\n{STACK}\nPlease add a `peek` method that returns the top item, and "
    "show the whole class.",
    "Quote this passage back in full, word for word: The river runs past the old mill, under "
    "the stone bridge and into the lake, where the boats wait for summer and the children swim "
    "from the wooden pier until the evening bell.",
    'Return this JSON object unchanged: {"name": "Ada Lovelace", "born": 1815, "city": '
    '"London", "languages": ["English", "French"], "fields": ["mathematics", "computing"]}',
]
CONCURRENCY = {1: 8, 8: 16}  # concurrency -> requests


def run(url: str, model: str, concurrency: int, prompt_file: str | None, extra) -> dict:
    args = ["--base-url", url, "--model", model, "--endpoint", "chat", "--temperature", "0",
            "--output-len", "96", "--concurrency", str(concurrency),
            "--num-requests", str(CONCURRENCY[concurrency]), "--input-len", "64",
            "--warmup", "1", *extra]  # fmt: skip
    if prompt_file:
        args += ["--prompt-file", prompt_file]
    s = bench_serving.main(args)[0]
    return {"tok_s": s["output_throughput"], "tpot_p50": s["tpot_ms"]["p50"],
            "itl_p50": s["itl_ms"]["p50"]}  # fmt: skip


def spec_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text

    def value(name: str) -> float:
        m = re.search(rf"^tokenmill:{name}_total{{[^}}]*}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("spec_decode_num_draft_tokens"), value("spec_decode_num_accepted_tokens")


WORKLOADS = (("repetitive", True), ("free", False))  # (name, from the repetitive prompts)


def measure(url: str, model: str, c: int, prompt_file: str | None, extra) -> dict:
    """One run on one server, with the acceptance rate from its counters' change."""
    before = spec_counters(url)
    r = run(url, model, c, prompt_file, extra)
    after = spec_counters(url)
    drafted, accepted = after[0] - before[0], after[1] - before[1]
    r["acceptance"] = accepted / drafted if drafted else None
    return r


def one_round(urls: dict[str, str], model: str, order: list[str], prompt_file: str,
              extra) -> dict:  # fmt: skip
    """Every workload and concurrency, on each server in `order`, back to back."""
    out: dict[str, dict] = {name: {} for name in urls}
    for workload, repetitive in WORKLOADS:
        # NOTE: a repetitive answer ends where the model ends it (tokens forced past its end
        # are not the workload); free chat runs to a fixed length, as bench_serving does
        pf, eos = (prompt_file, ["--no-ignore-eos"]) if repetitive else (None, [])
        for c in CONCURRENCY:
            for name in order:
                out[name][f"{workload} c={c}"] = measure(urls[name], model, c, pf,
                                                         [*eos, *extra])  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="even: each server goes first as often")
    p.add_argument("--port", type=int, default=8320)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--method", choices=["ngram", "draft_model"], default="ngram")
    p.add_argument("--draft", default=None, help="draft_model: the draft (GGUF, HF folder)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--server-args", default="",
                   help='more flags for both servers, e.g. "--dtype float32"')  # fmt: skip
    args, extra = p.parse_known_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.method == "draft_model":
        if args.draft is None:
            p.error("--method draft_model needs --draft PATH")
        spec = json.dumps({"method": "draft_model", "model": args.draft,
                           "num_speculative_tokens": args.k})  # fmt: skip
    else:
        spec = json.dumps({"method": "ngram", "num_speculative_tokens": args.k,
                           "prompt_lookup_max": 4, "prompt_lookup_min": 2})  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(text) + "\n" for text in REPETITIVE))
        prompt_file = f.name
    # NOTE: on one GPU the two servers share its memory (the CPU ignores the flag)
    flags = ["--gpu-memory-utilization", "0.45", *args.server_args.split()]
    servers = {"plain": flags, "spec": [*flags, "--speculative-config", spec]}
    rounds = []
    with contextlib.ExitStack() as stack:
        stack.callback(Path(prompt_file).unlink, missing_ok=True)
        # NOTE: both servers stay up (an idle one takes under 1% of a core) and serve in
        # turn, never both at once: each pair of runs is seconds apart, so the VM's drift
        # between them is small; the order alternates by round.
        urls = {name: stack.enter_context(running(tokenmill_cmd(args.port + i, *f),
                                                  args.port + i, f"tokenmill ({name})"))
                for i, (name, f) in enumerate(servers.items())}  # fmt: skip
        model = httpx.get(urls["plain"] + "/v1/models").json()["data"][0]["id"]
        for r in range(args.rounds):
            order = ["plain", "spec"] if r % 2 == 0 else ["spec", "plain"]
            rounds.append(one_round(urls, model, order, prompt_file, extra))
            print(f"round {r + 1}: " + ", ".join(
                f"{key} {x['tok_s'] / rounds[-1]['plain'][key]['tok_s']:.2f}x"
                for key, x in rounds[-1]["spec"].items()), flush=True)  # fmt: skip
    summary = {}
    print(f"\n{'workload':<16} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>9} "
          f"{'per round':>10} {'accept':>7} {'ITL p50 plain/spec ms':>22}")  # fmt: skip
    for key in rounds[0]["plain"]:
        ratios = [x["spec"][key]["tok_s"] / x["plain"][key]["tok_s"] for x in rounds]
        acc = [x["spec"][key]["acceptance"] for x in rounds
               if x["spec"][key]["acceptance"] is not None]  # fmt: skip
        plain_tok = [x["plain"][key]["tok_s"] for x in rounds]
        spec_tok = [x["spec"][key]["tok_s"] for x in rounds]
        itl = (statistics.median(x["plain"][key]["itl_p50"] for x in rounds),
               statistics.median(x["spec"][key]["itl_p50"] for x in rounds))  # fmt: skip
        summary[key] = {
            "speedup": statistics.median(ratios),
            "speedups": ratios,
            "acceptance": statistics.median(acc) if acc else None,
            "plain_tok_s": plain_tok,
            "spec_tok_s": spec_tok,
            "itl_p50_ms": itl,
        }
        acc_text = f"{summary[key]['acceptance']:.0%}" if acc else "-"
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{key:<16} {statistics.median(plain_tok):>11.1f} "
              f"{statistics.median(spec_tok):>10.1f} {statistics.median(ratios):>8.2f}x "
              f"{spread:>10} {acc_text:>7} {itl[0]:>10.1f} / {itl[1]:.1f}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": rounds, "summary": summary},
                                                  indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
