#!/usr/bin/env bash
# `make gpu`: everything that needs the GPU machine, in one go, with that machine's python3 (no
# venv, no downloads; ../shared/gpu/README.md). Builds in place, runs the whole test suite (the
# tests that need a CUDA device first: every op on the cuda and triton backends with CUDA
# tensors) with compute-sanitizer's memcheck, racecheck, synccheck and initcheck beside them
# (each over a smoke run of every CUDA and Triton kernel), then the benchmarks of every op
# (measured beside the roofline model's predictions in the summary); bundles
# benchmarks/results/<gpu>/ and the log into $OUT/results.tar.gz when OUT is set. Each stage has a time limit so the whole run ends within
# 9 minutes.
#
# Time is what the GPU machine is short of, so: the tests run on pytest-xdist's workers where the
# machine has xdist (PYTEST_WORKERS, default 8); beside the tests, one process runs every
# benchmark case once (`python -m benchmarks --warm-only`) so that torch.compile's graphs and
# the Triton kernels are in their on-disk caches before anything is timed (it is stopped before
# the first timed case); the benchmark time left is shared among the ops by their numbers of
# cases, less 150 s for `python -m benchmarks.kernel_times` (each case's GPU busy time by
# kernel against its span), the host's cost of launches and calls on this machine
# (`python -m benchmarks.host_overhead --launches`: host_costs.csv) and Nsight Compute over the
# kernels furthest over the roofline model (`benchmarks/ncu_targets.py`: ncu.csv), then the CPU
# tests take what is left. GPU_STAGES
# (default "tests sanitizers bench") picks stages; GPU_RESUME=1 keeps the
# cases a results CSV already holds in full (python -m benchmarks --resume), so a second run
# finishes the benchmarks that a first one ran out of time for.
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

STAGES=" ${GPU_STAGES:-tests sanitizers bench} "
wants() { [[ "$STAGES" == *" $1 "* ]]; }

export PYPRUNE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
  --format=csv 2>/dev/null
stage build 200 $PY setup.py build_ext --inplace || { echo "build failed"; exit 1; }
# The results folder's name (empty without a CUDA device): ncu's output and the bundle go there.
gpu=$($PY -c "from benchmarks.harness import device_dir; print(device_dir('cuda'))" 2>/dev/null)

# Beside the tests: every benchmark case once, to fill the compile caches (see the header).
# Two processes: the convolution's cases (about half of all) and the other ops'. Without the
# tests (a second run on the same machine) there is nothing to hide the warm-up behind.
warm_pids=()
warm_logs=()
if wants bench && wants tests; then
  echo "== warm-up of the benchmarks' compile caches, in the background"
  for group in "--op kwta --op sap --op noise --op cas" "--op masked_conv"; do
    warm_logs+=("$(mktemp)")
    # shellcheck disable=SC2086  # the group is a list of arguments
    TORCHINDUCTOR_COMPILE_THREADS=4 $PY -m benchmarks --device cuda --warm-only $group \
      >"${warm_logs[-1]}" 2>&1 &
    warm_pids+=($!)
  done
fi

# compute-sanitizer's four tools, each over its own smoke run, side by side and beside the GPU
# tests (correctness tools both, so they may share the GPU; the benchmarks get the time): the
# stage costs the slowest tool's time, within the tests' own.
declare -A sanitizer_pid
sanitizer_logs=""
sanitizer_t0=0
sanitizers_start() {  # sanitizers_start SECONDS
  local tools=(memcheck racecheck synccheck initcheck) limit tool
  limit=$(clip "$1")
  if out_of_time sanitizers "$limit"; then
    stages+=(sanitizers)
    return 1
  fi
  stages+=("${tools[@]/#/sanitizer-}")
  echo "== sanitizers ${tools[*]} in the background (limit ${limit}s)"
  sanitizer_logs=$(mktemp -d)
  sanitizer_t0=$SECONDS
  for tool in "${tools[@]}"; do
    timeout --kill-after=10 "$limit" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      $PY -m tests.smoke >"$sanitizer_logs/$tool.log" 2>&1 &
    sanitizer_pid[$tool]=$!
  done
}
sanitizers_wait() {
  local tool rc
  for tool in "${!sanitizer_pid[@]}"; do
    wait "${sanitizer_pid[$tool]}"
    rc=$?
    sed "s/^/[$tool] /" "$sanitizer_logs/$tool.log"
    result[sanitizer-$tool]="rc=$rc, done by $((SECONDS - sanitizer_t0))s"
    [ "$rc" -eq 0 ] || status=1
  done
  [ -n "$sanitizer_logs" ] && rm -rf "$sanitizer_logs"
}

# The whole test suite: the tests that need a CUDA device first (failures reported, up to 200;
# every test's outcome and time in tests-gpu.xml, bundled with the results), the CPU tests
# (which CI runs too) last, in the time the benchmarks leave.
xdist=()
if $PY -c "import xdist" 2>/dev/null; then
  xdist=(-n "${PYTEST_WORKERS:-8}")
  # Work stealing (pytest-xdist >= 3.2): a worker that runs out takes tests queued for the
  # others, so the slow Triton compiles do not leave one worker finishing long after the rest
  # (the H200 run: 736 s of tests on 8 workers took 128 s).
  if $PY -c "import importlib.metadata as m, sys; \
v = tuple(int(p) for p in m.version('pytest-xdist').split('.')[:2]); sys.exit(v < (3, 2))" \
      2>/dev/null; then
    xdist+=(--dist worksteal)
  fi
fi
junit=$(mktemp -d)
wants sanitizers && sanitizers_start 150  # racecheck, the slowest, did not finish in 60 s alone
if wants tests; then
  TORCHINDUCTOR_COMPILE_THREADS=1 stage tests-gpu 190 .ci/pytest_strict $PY -m pytest tests -q \
    -m gpu --maxfail=200 --tb=short -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$junit/tests-gpu.xml"
fi
wants sanitizers && sanitizers_wait

# Nothing may run beside the timed benchmarks: a sanitizer stopped at its limit may leave its
# target (python -m tests.smoke) running on the GPU, and the warm-up may still be running.
pkill -f "python3? -m tests.smoke" 2>/dev/null && echo "== stopped a sanitizer's leftover smoke run"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>/dev/null
for i in "${!warm_pids[@]}"; do
  if kill -0 "${warm_pids[$i]}" 2>/dev/null; then
    echo "== warm-up $i still running at the benchmarks' start: stopped"
    kill "${warm_pids[$i]}" 2>/dev/null
  fi
  wait "${warm_pids[$i]}" 2>/dev/null
  sed "s/^/[warm $i] /" "${warm_logs[$i]}" | tail -n 30
  rm -f "${warm_logs[$i]}"
done
# One process per op, each given a share of the time left by its number of cases (the CSV of an
# op is written after each of its cases, so an op stopped by its limit keeps the cases it
# finished).
ops=(kwta sap noise cas masked_conv)
resume=()
[ "${GPU_RESUME:-0}" = 1 ] && resume=(--resume)
if wants bench; then
  declare -A ncases
  for op in "${ops[@]}"; do
    ncases[$op]=$($PY -c "from benchmarks import $op; print(len($op.CASES))" 2>/dev/null || echo 1)
  done
  for i in "${!ops[@]}"; do
    left=$((DEADLINE - RESERVE - 150 - SECONDS))  # 150 s kept for kernel-times, host-costs, ncu
    total=0
    for op in "${ops[@]:$i}"; do total=$((total + ncases[$op])); done
    share=$((left * ncases[${ops[$i]}] / total))
    [ "$share" -ge 10 ] || share=$left  # too little to share: what is left to this op
    stage "bench-${ops[$i]}" "$share" $PY -m benchmarks --device cuda --op "${ops[$i]}" \
      "${resume[@]}"
  done
fi

# Where each case's time goes: GPU busy time a call against its span, by kernel (kernel_times.csv).
wants bench && stage kernel-times 90 $PY -m benchmarks.kernel_times

# The host's own cost of a launch and of each op's call on this machine (host_costs.csv): the
# roofline's host figures come from the dev VM, and the small cases measured far above them.
if wants bench && [ -n "$gpu" ]; then
  stage host-costs 60 $PY -m benchmarks.host_overhead --launches --device cuda \
    --out "benchmarks/results/$gpu/host_costs.csv"
fi

# Nsight Compute over the kernels furthest over the model, one call each
# (benchmarks/ncu_targets.py): throughput, occupancy and warp stall reasons, into ncu.csv.
if wants bench; then
  if [ -z "$gpu" ]; then
    echo "== ncu: no CUDA device, skipped"
  elif command -v ncu >/dev/null 2>&1; then
    ncu_dir="benchmarks/results/$gpu"
    mkdir -p "$ncu_dir"
    mapfile -t ncu_args < <($PY -m benchmarks.ncu_targets --ncu-args)
    stage ncu 75 ncu --log-file "$ncu_dir/ncu.csv" "${ncu_args[@]}" $PY -m benchmarks.ncu_targets
    $PY -m benchmarks.ncu_targets --summarize "$ncu_dir/ncu.csv"
  else
    echo "== ncu: not installed, skipped"
  fi
fi

if wants tests; then
  TORCHINDUCTOR_COMPILE_THREADS=1 stage tests-rest 60 .ci/pytest_strict $PY -m pytest tests -q \
    -m "not gpu" --maxfail=20 --tb=short -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$junit/tests-rest.xml"
fi

if [ -n "${OUT:-}" ] && [ -n "$gpu" ] && [ -d "benchmarks/results/$gpu" ]; then
  [ -f "$OUT/gpu.log" ] && cp "$OUT/gpu.log" "benchmarks/results/$gpu/gpu.log"
  cp "$junit"/*.xml "benchmarks/results/$gpu/" 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu"
  echo "bundled benchmarks/results/$gpu into $OUT/results.tar.gz"
fi

echo "== summary"
for name in "${stages[@]}"; do printf '%-18s %s\n' "$name" "${result[$name]:-not run}"; done
[ -n "$gpu" ] && $PY -m benchmarks.readme_table --device "$gpu" 2>/dev/null
# Measured beside the roofline model's prediction for each case, with the SPEC's GPU goals.
[ -n "$gpu" ] && $PY -m benchmarks.roofline --compare "benchmarks/results/$gpu" --goals 2>/dev/null
exit $status
