"""The soak's report: per-process RSS and fd slopes, p99 latency windows, the failures
that decide the exit code, and the summary printed to stdout."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from typing import TYPE_CHECKING

from bench_serving import percentile
from soak_requests import FAILED, Result
from soak_traffic import KINDS

if TYPE_CHECKING:
    from soak import Run


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def judge_process(name: str, samples: list[dict], args) -> tuple[dict, list[str]]:
    """Slopes after the warm-up (a short run: its last 3 samples at least)."""
    fit = [s for s in samples if s["t_s"] >= args.warmup]
    fit = fit if len(fit) >= 3 else samples[-3:]
    rss = slope_per_min([(s["t_s"], s["rss_mib"]) for s in fit])
    fds = slope_per_min([(s["t_s"], s["fds_less_http"]) for s in fit])
    pids = sorted({s["pid"] for s in samples})
    problems = [f"{name}: restarted (pids {pids})"] if len(pids) > 1 else []
    if rss is not None and rss > args.max_rss_slope:
        problems.append(f"{name}: RSS grows {rss:.2f} MiB/min")
    if fds is not None and fds > args.max_fd_slope:
        problems.append(f"{name}: fds grow {fds:.2f}/min")
    first, last = samples[0], samples[-1]
    summary = {"pids": pids, "num_samples": len(samples), "fit_from_s": fit[0]["t_s"],
               "rss_mib_first": first["rss_mib"], "rss_mib_last": last["rss_mib"],
               "rss_slope_mib_per_min": rss, "fds_first": first["fds"], "fds_last": last["fds"],
               "fd_slope_per_min": fds, "samples": samples}  # fmt: skip
    return summary, problems


def latency_windows(results: list[Result], window: float) -> list[dict]:
    """p99 E2E and TTFT (streamed) of the answered generations, per window of start time."""
    groups: dict[int, list[Result]] = defaultdict(list)
    for r in results:
        if r.outcome == "ok" and r.kind != "bad":
            groups[int(r.start_s // window)].append(r)
    out = []
    for i, rs in sorted(groups.items()):
        e2e = [r.e2e_s * 1000 for r in rs]
        ttft = [r.ttft_s * 1000 for r in rs if r.ttft_s is not None]
        out.append({"start_s": i * window, "end_s": (i + 1) * window, "requests": len(rs),
                    "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99),
                    "ttft_p99_ms": percentile(ttft, 99) if ttft else None})  # fmt: skip
    return out


def build_report(args, run: Run, base_url: str) -> dict:
    by_kind = {k: dict(Counter(r.outcome for r in run.results if r.kind == k)) for k in KINDS}
    outcomes = Counter(r.outcome for r in run.results)
    failures = [f"{outcomes[o]} {o}" for o in FAILED if outcomes[o]]
    failures += [f"idle check at {c['t_s']} s: {c['leaks'] or c['canary_detail'] or c['canary']}"
                 for c in run.checks if not c["ok"]]  # fmt: skip
    processes = {}
    for name, samples in sorted(run.samples.items()):
        processes[name], problems = judge_process(name, samples, args)
        failures += problems
    if not run.drain.get("ok", True):
        failures.append(f"{run.drain['close_wait_left']} connections left in CLOSE_WAIT")
    examples = [asdict(r) for r in run.results if r.outcome in FAILED][:20]
    return {
        "config": vars(args),
        "base_url": base_url,
        "thresholds": {
            "rss_slope_mib_per_min": args.max_rss_slope,
            "fd_slope_per_min": args.max_fd_slope,
        },  # fmt: skip
        "requests": {
            "total": len(run.results),
            "by_outcome": dict(outcomes),
            "by_kind": by_kind,
            "failed_examples": examples,
        },  # fmt: skip
        "lost": outcomes["lost"],
        "stuck": outcomes["stuck"],
        "http_5xx": outcomes["http_5xx"],
        "unexpected": outcomes["unexpected"],
        "latency_windows": latency_windows(run.results, args.window),
        "invariant_checks": run.checks,
        "connection_drain": run.drain,
        "processes": processes,
        "failures": failures,
        "passed": not failures,
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(rep: dict) -> None:
    req = rep["requests"]
    print(f"{req['total']} requests: {rep['lost']} lost, {rep['stuck']} stuck, "
          f"{rep['http_5xx']} 5xx, {rep['unexpected']} unexpected")  # fmt: skip
    for kind, counts in req["by_kind"].items():
        print(f"  {kind:<14} " + ", ".join(f"{o} {n}" for o, n in sorted(counts.items())))
    for w in rep["latency_windows"]:
        print(f"  {w['start_s']:>5.0f}-{w['end_s']:<5.0f} s: {w['requests']:>4} answered, "
              f"E2E p50 {fmt(w['e2e_p50_ms'], '.0f')} p99 {fmt(w['e2e_p99_ms'], '.0f')} ms, "
              f"TTFT p99 {fmt(w['ttft_p99_ms'], '.0f')} ms")  # fmt: skip
    head = f"{'process':<12} {'samples':>7} {'RSS MiB':>17} {'MiB/min':>8} {'fds':>9} {'fd/min':>7}"
    print("  " + head)
    for name, p in rep["processes"].items():
        print(f"  {name:<12} {p['num_samples']:>7} "
              f"{p['rss_mib_first']:>8.1f}>{p['rss_mib_last']:<8.1f} "
              f"{fmt(p['rss_slope_mib_per_min']):>8} {p['fds_first']:>4}>{p['fds_last']:<4} "
              f"{fmt(p['fd_slope_per_min']):>7}")  # fmt: skip
    checks = rep["invariant_checks"]
    settled = ", ".join(f"{c['settle_s']:.1f}" for c in checks)
    passed = sum(c["ok"] for c in checks)
    print(f"  idle checks: {passed}/{len(checks)} passed (settled in {settled} s)")
    drain = rep["connection_drain"]
    if drain:
        print(f"  connections left in CLOSE_WAIT {drain['waited_s']:.0f} s after the end: "
              f"{drain['close_wait_left']}")  # fmt: skip
    print("PASSED" if rep["passed"] else "FAILED: " + "; ".join(rep["failures"]))
