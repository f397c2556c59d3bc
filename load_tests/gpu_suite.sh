#!/usr/bin/env bash
# The GPU suite of issue 14 on an air-gapped GPU host, with the host's own python3:
#   load_tests/gpu_suite.sh OUTDIR [--budget-s 480] [--dry-run]
# Installs the wheelhouse (`make wheelhouse`, elsewhere) with --no-index --no-deps into a
# temporary directory on PYTHONPATH (never a registry, never `make install`), then runs
# load_tests/gpu_bench.py, which writes OUTDIR/gpu_suite.json and OUTDIR/gpu_suite.md after
# every step and stops itself at the budget.
# --dry-run: the same steps on the tiny config on the CPU; the wheelhouse (if built) is only
# checked to install for Python 3.12 / manylinux, not put on PYTHONPATH ($PYTHON: the Python).
set -euo pipefail
usage() { echo "usage: $0 OUTDIR [--budget-s SECONDS] [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUTDIR=$1; shift
BUDGET=480; DRY=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --budget-s) [[ $# -ge 2 ]] || usage; BUDGET=$2; shift 2 ;;
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
cd "$REPO"
PYTHONPATH="$SITE$REPO${PYTHONPATH:+:$PYTHONPATH}" \
  exec "$PY" load_tests/gpu_bench.py "$OUTDIR" --budget-s "$BUDGET" "${DRY[@]}"
