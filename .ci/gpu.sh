#!/usr/bin/env bash
# `make gpu`: everything that needs the GPU machine, in one go, with that machine's python3 (no
# venv, no downloads; ../shared/gpu/README.md). Builds in place, runs the whole test suite (the
# tests that need a CUDA device first: every op on the cuda and triton backends with CUDA
# tensors), compute-sanitizer's memcheck, racecheck, synccheck and initcheck over a smoke run
# of every CUDA and Triton kernel, then the benchmarks of every op (measured beside the roofline
# model's predictions in the summary); bundles benchmarks/results/<gpu>/ and the log into
# $OUT/results.tar.gz when OUT is set. Each stage has a time limit so the whole run ends within
# 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
declare -A result

# The device tool stops a command after 600 s: every stage's limit is clipped so that the whole
# run, bundling included, ends by DEADLINE seconds (default 540).
DEADLINE=${GPU_DEADLINE_S:-540}
RESERVE=30  # for bundling and the summary
stages=()

clip() {  # clip SECONDS: the limit of a stage starting now, so that it ends by the deadline
  local left=$((DEADLINE - RESERVE - SECONDS))
  echo $(($1 < left ? $1 : left))
}

out_of_time() {  # out_of_time NAME LIMIT: whether LIMIT is too short to start stage NAME
  [ "$2" -lt 10 ] || return 1
  echo "== $1 skipped: out of time"
  result[$1]="skipped (out of time)"
  status=1
}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit
  limit=$(clip "$2")
  shift 2
  stages+=("$name")
  out_of_time "$name" "$limit" && return 1
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  result[$name]="rc=$rc, $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

export PYPRUNE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
stage build 240 $PY setup.py build_ext --inplace || { echo "build failed"; exit 1; }
# The whole test suite, the tests that need a CUDA device first; failures reported, up to 20.
stage tests-gpu 100 .ci/pytest_strict $PY -m pytest tests -q -m gpu --maxfail=20 -p no:cacheprovider
stage tests-rest 60 .ci/pytest_strict $PY -m pytest tests -q -m "not gpu" --maxfail=20 -p no:cacheprovider
# compute-sanitizer's four tools, each over its own smoke run, side by side: the GPU holds all
# four processes, so the stage costs the slowest tool's time rather than the sum, which the
# deadline could not afford before the benchmarks.
sanitizers() {  # sanitizers SECONDS
  local tools=(memcheck racecheck synccheck initcheck) limit tool rc t0=$SECONDS logs
  local -A pid
  limit=$(clip "$1")
  if out_of_time sanitizers "$limit"; then
    stages+=(sanitizers)
    return 1
  fi
  stages+=("${tools[@]/#/sanitizer-}")
  echo "== sanitizers ${tools[*]} (limit ${limit}s)"
  logs=$(mktemp -d)
  for tool in "${tools[@]}"; do
    timeout --kill-after=10 "$limit" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      $PY -m tests.smoke >"$logs/$tool.log" 2>&1 &
    pid[$tool]=$!
  done
  for tool in "${tools[@]}"; do
    wait "${pid[$tool]}"
    rc=$?
    sed "s/^/[$tool] /" "$logs/$tool.log"
    result[sanitizer-$tool]="rc=$rc, done by $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
  done
  rm -rf "$logs"
}
sanitizers 75
# One process per op, each given an equal share of the time left (the CSV of an op is written
# after each of its cases, so an op stopped by its limit keeps the cases it finished).
ops=(kwta sap noise cas masked_conv)
for i in "${!ops[@]}"; do
  left=$((DEADLINE - RESERVE - SECONDS))
  share=$((left / (${#ops[@]} - i)))
  [ "$share" -ge 10 ] || share=$left  # too little to share: what is left to this op
  stage "bench-${ops[$i]}" "$share" $PY -m benchmarks --device cuda --op "${ops[$i]}"
done

gpu=$($PY -c "from benchmarks.harness import device_dir; print(device_dir('cuda'))" 2>/dev/null)
if [ -n "${OUT:-}" ] && [ -n "$gpu" ] && [ -d "benchmarks/results/$gpu" ]; then
  [ -f "$OUT/gpu.log" ] && cp "$OUT/gpu.log" "benchmarks/results/$gpu/gpu.log"
  tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu"
  echo "bundled benchmarks/results/$gpu into $OUT/results.tar.gz"
fi

echo "== summary"
for name in "${stages[@]}"; do printf '%-18s %s\n' "$name" "${result[$name]:-not run}"; done
[ -n "$gpu" ] && $PY -m benchmarks.readme_table --device "$gpu" 2>/dev/null
# Measured beside the roofline model's prediction for each case, with the SPEC's GPU goals.
[ -n "$gpu" ] && $PY -m benchmarks.roofline --compare "benchmarks/results/$gpu" --goals 2>/dev/null
exit $status
