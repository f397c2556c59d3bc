"""Speculative decoding benchmark: output tok/s with and without speculation.

    python load_tests/bench_speculative.py --rounds 2 --json-out spec.json
    python load_tests/bench_speculative.py --method draft_model --draft DRAFT.gguf --k 3
    python load_tests/bench_speculative.py --rounds 1 --server-args "--dtype float32"

Per round, one tokenmill server without speculation and one with
`--speculative-config '{"method": "ngram", "num_speculative_tokens": K}'` (default K=7;
`--method draft_model --draft PATH`: proposals from that draft model instead) run in turn
(never both at once); each serves, through bench_serving (chat, greedy), a repetitive
workload (rewrite a given code block with one change, quote a passage, return a JSON object
unchanged; up to 96 output tokens, ending where the model ends its answer) and free chat
(bench_serving's synthetic prompts, 96 output tokens) at concurrency 1 and 8. Reported:
output tok/s, ITL p50, the speed-up (median over rounds) and the acceptance rate from the
server's spec_decode counters.
Targets: >= 1.8x at c=1 on the repetitive workload; no slowdown beyond 5% on free chat.
"""

from __future__ import annotations

import argparse
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


def serve_all(port: int, flags: list[str], prompt_file: str, extra) -> dict:
    out = {}
    with running(tokenmill_cmd(port, *flags), port, "tokenmill") as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # NOTE: a repetitive answer ends where the model ends it (tokens forced past its end
        # are not the workload); free chat runs to a fixed length, as bench_serving does
        for workload, pf, eos in (("repetitive", prompt_file, ["--no-ignore-eos"]),
                                  ("free", None, [])):  # fmt: skip
            for c in CONCURRENCY:
                before = spec_counters(url)
                r = run(url, model, c, pf, [*eos, *extra])
                after = spec_counters(url)
                drafted, accepted = after[0] - before[0], after[1] - before[1]
                r["acceptance"] = accepted / drafted if drafted else None
                out[f"{workload} c={c}"] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8320)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--method", choices=["ngram", "draft_model"], default="ngram")
    p.add_argument("--draft", default=None, help="draft_model: the draft (GGUF, HF folder)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--server-args", default="",
                   help='more flags for both servers, e.g. "--dtype float32"')  # fmt: skip
    args, extra = p.parse_known_args()
    if args.method == "draft_model":
        if args.draft is None:
            p.error("--method draft_model needs --draft PATH")
        spec = json.dumps({"method": "draft_model", "model": args.draft,
                           "num_speculative_tokens": args.k})  # fmt: skip
    else:
        spec = json.dumps({"method": "ngram", "num_speculative_tokens": args.k,
                           "prompt_lookup_max": 4, "prompt_lookup_min": 2})  # fmt: skip
    rounds = []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(text) + "\n" for text in REPETITIVE))
        prompt_file = f.name
    for _ in range(args.rounds):
        flags = args.server_args.split()
        plain = serve_all(args.port, flags, prompt_file, extra)
        spec_run = serve_all(args.port, [*flags, "--speculative-config", spec], prompt_file, extra)
        rounds.append({"plain": plain, "spec": spec_run})
    summary = {}
    print(f"\n{'workload':<16} {'plain tok/s':>12} {'spec tok/s':>12} {'speed-up':>9} "
          f"{'accept':>7} {'ITL p50 plain/spec ms':>24}")  # fmt: skip
    for key in rounds[0]["plain"]:
        ratio = statistics.median(x["spec"][key]["tok_s"] / x["plain"][key]["tok_s"]
                                  for x in rounds)  # fmt: skip
        acc = [x["spec"][key]["acceptance"] for x in rounds if x["spec"][key]["acceptance"]]
        plain_tok = [x["plain"][key]["tok_s"] for x in rounds]
        spec_tok = [x["spec"][key]["tok_s"] for x in rounds]
        itl = (statistics.median(x["plain"][key]["itl_p50"] for x in rounds),
               statistics.median(x["spec"][key]["itl_p50"] for x in rounds))  # fmt: skip
        summary[key] = {
            "speedup": ratio,
            "acceptance": statistics.median(acc) if acc else None,
            "plain_tok_s": plain_tok,
            "spec_tok_s": spec_tok,
            "itl_p50_ms": itl,
        }
        acc_text = f"{summary[key]['acceptance']:.0%}" if acc else "-"
        print(f"{key:<16} {', '.join(f'{v:.1f}' for v in plain_tok):>12} "
              f"{', '.join(f'{v:.1f}' for v in spec_tok):>12} {ratio:>8.2f}x {acc_text:>7} "
              f"{itl[0]:>11.1f} / {itl[1]:.1f}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": rounds, "summary": summary},
                                                  indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
