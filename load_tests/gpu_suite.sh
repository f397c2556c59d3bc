#!/usr/bin/env bash
# The GPU suite of issue 14 on an air-gapped GPU host, with the host's own python3:
#   load_tests/gpu_suite.sh OUTDIR [--budget-s 480] [--quantized-budget-s 360] [--dry-run]
# Installs the wheelhouse (`make wheelhouse`, elsewhere) with --no-index --no-deps into a
# temporary directory on PYTHONPATH (never a registry, never `make install`), then runs
# load_tests/gpu_bench.py, which writes OUTDIR/gpu_suite.json and OUTDIR/gpu_suite.md after
# every step and stops itself at the budget; then load_tests/bench_quantized.py (issue 19:
# bf16, FP8 and AWQ-shaped 4-bit dummy weights beside TRT-LLM's FP8 H200 figures), which
# writes OUTDIR/quantized.json and OUTDIR/quantized.md within --quantized-budget-s (0: skip).
# --dry-run: the same steps on the tiny config on the CPU; the wheelhouse (if built) is only
# checked to install for Python 3.12 / manylinux, not put on PYTHONPATH ($PYTHON: the Python);
# the quantized stage is skipped unless --quantized-budget-s is given (it takes ~40 s).
set -euo pipefail
usage() {
  echo "usage: $0 OUTDIR [--budget-s SECONDS] [--quantized-budget-s SECONDS] [--dry-run]" >&2
  exit 2
}
[[ $# -ge 1 && $1 != -* ]] || usage
OUTDIR=$1; shift
BUDGET=480; QBUDGET=""; DRY=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --budget-s) [[ $# -ge 2 ]] || usage; BUDGET=$2; shift 2 ;;
    --quantized-budget-s) [[ $# -ge 2 ]] || usage; QBUDGET=$2; shift 2 ;;
    --dry-run) DRY=(--dry-run); shift ;;
    *) usage ;;
  esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=$REPO/.whl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUTDIR"
SITE=""
if [[ ${#DRY[@]} -eq 0 ]]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run make wheelhouse" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --target "$TMP/site" "$WHEELS"/*.whl
  SITE=$TMP/site:
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$TMP/check" --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    "$WHEELS"/*.whl && echo "wheelhouse: installs for cp312 manylinux" >&2
fi
[[ -n $QBUDGET ]] || { [[ ${#DRY[@]} -eq 0 ]] && QBUDGET=360 || QBUDGET=0; }
cd "$REPO"
export PYTHONPATH="$SITE$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" load_tests/gpu_bench.py "$OUTDIR" --budget-s "$BUDGET" "${DRY[@]}"
if [[ $QBUDGET != 0 ]]; then
  "$PY" load_tests/bench_quantized.py "$OUTDIR" --budget-s "$QBUDGET" "${DRY[@]}"
fi
