#!/usr/bin/env bash
# `make gpu`: everything that needs the GPU machine, in one go, with that machine's python3 (no
# venv, no downloads; ../shared/gpu/README.md). Builds in place, runs the whole test suite on
# CUDA, compute-sanitizer memcheck over a smoke run of every CUDA and Triton kernel, then the
# benchmarks; bundles benchmarks/results/<gpu>/ and the log into $OUT/results.tar.gz when OUT is
# set. Each stage has a time limit so the whole run ends within 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
declare -A result

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  result[$name]="rc=$rc, $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

export PYPRUNE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
stage build 240 $PY setup.py build_ext --inplace || { echo "build failed"; exit 1; }
stage tests 150 .ci/pytest_strict $PY -m pytest tests -q -x -p no:cacheprovider
stage sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m tests.smoke
stage benchmarks 200 $PY -m benchmarks --device cuda

gpu=$($PY -c "from benchmarks.harness import device_dir; print(device_dir('cuda'))" 2>/dev/null)
if [ -n "${OUT:-}" ] && [ -n "$gpu" ] && [ -d "benchmarks/results/$gpu" ]; then
  [ -f "$OUT/gpu.log" ] && cp "$OUT/gpu.log" "benchmarks/results/$gpu/gpu.log"
  tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu"
  echo "bundled benchmarks/results/$gpu into $OUT/results.tar.gz"
fi

echo "== summary"
for name in build tests sanitizer benchmarks; do printf '%-12s %s\n' "$name" "${result[$name]:-not run}"; done
[ -n "$gpu" ] && $PY -m benchmarks.readme_table --device "$gpu" 2>/dev/null
exit $status
