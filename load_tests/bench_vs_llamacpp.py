"""tokenmill against llama.cpp's `llama-server` on the same GGUF, taken side by side.

    python load_tests/bench_vs_llamacpp.py --rounds 2 --json-out vs-llamacpp.json

`llama-server` comes from `--llama-server`, `$LLAMA_SERVER`, or a cached build; failing those
it is built once from the llama.cpp sources vendored in the `llama-cpp-python` sdist (PyPI)
with cmake (and ninja when present), ~6 minutes on 2 cores, under
`$TOKENMILL_CACHE_DIR/llama.cpp/<version>` (default ~/.cache/tokenmill), never in the repo.

Each round serves the default model's GGUF with llama-server (every core, 32 slots) and
then with tokenmill in its default mode (or `--tokenmill-flag`s), one server at a time, and
runs bench_serving's streamed chat requests against each at concurrency 1, 8 and 32
(64-token prompts, 64 output tokens with `ignore_eos`; each level its own prompts). It
prints output tok/s, TTFT p50 and ITL p50, and tokenmill's ratio to llama.cpp per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_serving  # noqa: E402
from servers import running, tokenmill_cmd  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
LEVELS = (1, 8, 32)


def cache_root() -> Path:
    from model_runner.config import cache_dir

    return cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON


def build_llama_server(root: Path) -> Path:
    """Download the sdist, build its llama-server once; returns the binary."""
    exe = root / "build" / "bin" / "llama-server"
    if exe.is_file():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)],
        check=True,
    )  # fmt: skip
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as sdist:
        sdist.extractall(root / "src", filter="data")
    source = next((root / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(root / "build"), *generator,
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"],
        check=True,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    cmd = ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", jobs]
    subprocess.run(cmd, check=True)
    return exe


def llama_server(args: argparse.Namespace) -> Path:
    given = args.llama_server or os.environ.get("LLAMA_SERVER")
    return Path(given) if given else build_llama_server(cache_root())


def sweep(base_url: str, args: argparse.Namespace) -> dict[int, dict]:
    """One bench_serving run per concurrency level; {level: summary}."""
    out = {}
    for level in LEVELS:
        (summary,) = bench_serving.main(
            ["--base-url", base_url, "--concurrency", str(level),
             "--num-requests", str(max(args.min_requests, 2 * level)),
             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
             "--warmup", "2", "--seed", str(1000 * level)]
        )  # fmt: skip
        out[level] = summary
    return out


def one_round(args: argparse.Namespace, exe: Path, gguf: Path) -> dict[str, dict]:
    threads = str(args.threads or os.cpu_count() or 2)
    llama_cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(args.port),
                 "-t", threads, "-np", "32", "-c", str(32 * 512), "--no-webui"]  # fmt: skip
    results = {}
    with running(llama_cmd, args.port, "llama-server") as url:
        results["llama.cpp"] = sweep(url, args)
    cmd = tokenmill_cmd(args.port, *args.tokenmill_flag)
    with running(cmd, args.port, "tokenmill", args.start_timeout) as url:
        results["tokenmill"] = sweep(url, args)
    return results


def print_round(i: int, res: dict[str, dict]) -> None:
    print(f"\nround {i}: output tok/s, TTFT p50 and ITL p50 (ms)")
    print(f"{'conc':>5} {'llama.cpp':>10} {'tokenmill':>10} {'ratio':>6} "
          f"{'TTFT l.cpp':>11} {'TTFT tm':>8} {'ITL l.cpp':>10} {'ITL tm':>7}")  # fmt: skip
    for level in LEVELS:
        lc, tm = res["llama.cpp"][level], res["tokenmill"][level]
        ratio = tm["output_throughput"] / lc["output_throughput"]
        print(
            f"{level:>5} {lc['output_throughput']:>10.1f} {tm['output_throughput']:>10.1f} "
            f"{ratio:>6.2f} {lc['ttft_ms']['p50']:>11.1f} {tm['ttft_ms']['p50']:>8.1f} "
            f"{lc['itl_ms']['p50']:>10.1f} {tm['itl_ms']['p50']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--llama-server", default=None, help="a llama-server binary to use")
    p.add_argument("--model", default=None, help="a GGUF (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (all cores)")
    p.add_argument("--tokenmill-flag", action="append", default=[], help="extra serve flag")
    p.add_argument("--min-requests", type=int, default=16, help="per level (at least 2 x c)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--port", type=int, default=8019)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from model_runner.model_source import default_gguf_path

    exe, gguf = llama_server(args), Path(args.model) if args.model else default_gguf_path()
    if args.model:
        args.tokenmill_flag = [str(gguf), *args.tokenmill_flag]
    rounds = []
    for i in range(1, args.rounds + 1):
        rounds.append(one_round(args, exe, gguf))
        print_round(i, rounds[-1])
    ratios = {
        level: statistics.median(
            r["tokenmill"][level]["output_throughput"] / r["llama.cpp"][level]["output_throughput"]
            for r in rounds
        )
        for level in LEVELS
    }
    print(
        "\nmedian tokenmill / llama.cpp: " + ", ".join(f"c={c} {x:.2f}x" for c, x in ratios.items())
    )
    out = {"config": vars(args), "rounds": rounds, "median_ratio": ratios}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
