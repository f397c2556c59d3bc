"""The GPU suite's outputs: OUTDIR/gpu_suite.json (everything) and OUTDIR/gpu_suite.md (one
table: tokenmill, HF transformers, the published peer figure, the floor, the target)."""

from __future__ import annotations

import json
from pathlib import Path

# Published figures (one H100; the same engines measure ~1.15-1.3x faster on an H200).
PEERS = {
    "decode_heavy": "vLLM 0.6.0 31.0, SGLang 0.3.0 30.4 req/s (H100)",
    "prefill_heavy": "vLLM 59.0, SGLang 69.1, TRT-LLM 72.6 req/s (H100)",
    "sharegpt": "vLLM 36.8 req/s (H100)",
    "b1": "SGLang 6.42 ms, vLLM ~6.5 ms (H100)",
}
TARGETS = {
    "decode_heavy": ">= 43 req/s",
    "prefill_heavy": ">= 85 req/s",
    "b1": "<= 1.2x floor",
    "idle": "< 5%",
    "ttft": "p50 < 100 ms at 2 req/s",
    "startup": "< 60 s",
}


def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _get(data: dict, *path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def rows(data: dict) -> list[list[str]]:
    st = data["steps"]
    out = [["pytest -m gpu", str(_get(st, "pytest_gpu", "summary") or "-"), "", "", "", ""]]
    sz = data["sizes"]
    labels = (
        ("decode_heavy", "decode-heavy {}/{}".format(*sz["decode"])),
        ("prefill_heavy", "prefill-heavy {}/{}".format(*sz["prefill"])),
        ("sharegpt", "ShareGPT-like, mean {}/{}".format(*sz["sharegpt"])),
    )
    for name, label in labels:
        ours = _get(st, "offline", name)
        theirs = _get(st, "hf", name)
        out.append(
            [
                f"{label}, {sz['n']} requests: req/s (out tok/s)",
                f"{_f(_get(ours, 'req_per_s'))} ({_f(_get(ours, 'output_tok_per_s'), '.0f')})",
                f"{_f(_get(theirs, 'req_per_s'))} (batch {_get(theirs, 'batch') or '-'})",
                PEERS[name],
                "",
                TARGETS.get(name, ""),
            ]
        )
    decode = st.get("decode_step") or {}
    for key in sorted(k for k in decode if "/b" in k):
        mode, batch = key.split("/b")
        r = decode[key]
        hf_b1 = _get(st, "hf", "decode_b1", "ms_per_step") if batch == "1" else None
        out.append(
            [
                f"decode step, ctx {data['sizes']['context']}, batch {batch}, {mode}, ms",
                f"{_f(r.get('ms_per_step'))} ({_f(r.get('of_floor'))}x floor, idle "
                f"{_f(100 * r['idle_share'], '.1f') if 'idle_share' in r else '-'}%)",
                _f(hf_b1),
                PEERS["b1"] if batch == "1" else "",
                f"{_f(r.get('floor_ms'))} ms",
                TARGETS["b1"] if batch == "1" else (TARGETS["idle"] if batch == "64" else ""),
            ]
        )
    serving = st.get("serving") or {}
    for key in sorted(k for k in serving if k.startswith("rate_")):
        r = serving[key]
        out.append(
            [
                f"HTTP Poisson {key[5:]} req/s: TTFT / ITL p50, p99 ms",
                f"{_f(_get(r, 'ttft_ms', 'p50'), '.1f')}, {_f(_get(r, 'ttft_ms', 'p99'), '.1f')} / "
                f"{_f(_get(r, 'itl_ms', 'p50'), '.1f')}, {_f(_get(r, 'itl_ms', 'p99'), '.1f')}",
                "",
                "",
                "",
                TARGETS["ttft"] if key == "rate_2" else "",
            ]
        )
    out.append(
        [
            "start-up to healthy /health, s",
            _f(serving.get("startup_s")),
            "",
            "",
            "",
            TARGETS["startup"],
        ]
    )
    for name, step in st.items():
        if "error" in step or "skipped" in step:
            out.append(
                [f"{name}: not measured", step.get("error") or step["skipped"], "", "", "", ""]
            )
    return out


def markdown(data: dict) -> str:
    kind = "CPU dry run (tiny config; not GPU figures)" if data["dry_run"] else "GPU"
    head = ["what", "tokenmill", "HF transformers", "published peer", "floor", "target"]
    lines = [
        f"# GPU suite: {kind}, {data['sizes']['config']}, "
        f"{data.get('elapsed_s', 0):.0f} s of {data['budget_s']:.0f}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows(data):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(outdir: Path, data: dict) -> None:
    """Both files, replaced atomically, after every step."""
    for name, text in (
        ("gpu_suite.json", json.dumps(data, indent=2)),
        ("gpu_suite.md", markdown(data)),
    ):
        tmp = outdir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(outdir / name)
