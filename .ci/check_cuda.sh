#!/usr/bin/env bash
# make check-cuda: compile pyprune._C with every csrc/cuda/*.cu for sm_80 and sm_90 (plus PTX for
# newer GPUs) against the CUDA build of torch 2.14.1 (C++20), and for sm_90 alone against that of
# the oldest torch pyprune supports (2.11.0, the GPU machine's: C++17; its headers and language
# level are what that build checks, and the architectures' code paths are checked by the first),
# and check the result (SPEC section 5). There is no GPU here: this proves the CUDA sources build,
# not that they are right.
#
# Each torch version has its own venv (.venv-cuda for 2.14.1, .venv-cuda-<version> otherwise) and
# build directory (build/check-cuda, build/check-cuda-<version>), never in place: pyprune/_C*.so
# belongs to the CPU build that .venv uses. CHECK_CUDA_TORCH="2.14.1" checks one version only.
#
# Exit status: 0 checked, 1 failed, 77 skipped for lack of disk (.ci/run reports that as a skip,
# never as a pass).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PRIMARY=2.14.1
TORCH_VERSIONS=(${CHECK_CUDA_TORCH:-2.11.0 2.14.1})
venv_of() { [ "$1" = "$PRIMARY" ] && echo "$ROOT/.venv-cuda" || echo "$ROOT/.venv-cuda-$1"; }
out_of() { [ "$1" = "$PRIMARY" ] && echo "$ROOT/build/check-cuda" || echo "$ROOT/build/check-cuda-$1"; }
# sm_80 + sm_90 + compute_90 PTX for the primary torch, sm_90 for the others.
archs_of() { [ "$1" = "$PRIMARY" ] && echo "8.0;9.0+PTX" || echo "9.0"; }

# Disk: about 6 GB for each venv still to be made (the CUDA build of torch and its libraries),
# 1 GB for the builds.
NEED_GB=1
for version in "${TORCH_VERSIONS[@]}"; do
  [ -x "$(venv_of "$version")/bin/python" ] || NEED_GB=$((NEED_GB + 6))
done
FREE_GB=$(df -Pk "$ROOT" | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "$FREE_GB" -lt "$NEED_GB" ]; then
  echo "################################################################################" >&2
  echo "# SKIPPED check-cuda: only ${FREE_GB} GB free, need ${NEED_GB}" >&2
  echo "# (the CUDA builds of torch ${TORCH_VERSIONS[*]} and the sm_80/sm_90 compiles)." >&2
  echo "# CUDA sources NOT checked." >&2
  echo "################################################################################" >&2
  exit 77
fi

check_version() (  # check_version TORCH_VERSION, in a subshell: its exports stay its own
local TORCH_VERSION=$1
local VENV PY OUT
VENV=$(venv_of "$TORCH_VERSION")
PY="$VENV/bin/python"
OUT=$(out_of "$TORCH_VERSION")
echo "== check-cuda: torch $TORCH_VERSION ($VENV -> $OUT)"
have_torch() {
  "$PY" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
if [ ! -x "$PY" ]; then
  echo "check-cuda: creating $VENV"
  python3 -m venv "$VENV"
fi
if ! have_torch; then
  echo "check-cuda: installing torch==$TORCH_VERSION (CUDA build) into $VENV"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja
  have_torch || { echo "check-cuda: $VENV has no CUDA build of torch $TORCH_VERSION" >&2; exit 1; }
fi

export CUDA_HOME="${CHECK_CUDA_HOME:-/usr/local/cuda-13.0}"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export PATH="$CUDA_HOME/bin:$VENV/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="$(archs_of "$TORCH_VERSION")"
export PYPRUNE_CUDA=1
# Host code at -O0 (setup.py): this build is compiled, loaded and read, never run; the device
# code, and so the resource table that gpu-report reads from it, is the same.
export PYPRUNE_COMPILE_CHECK=1
export MAX_JOBS="${MAX_JOBS:-2}"

echo "check-cuda: building into $OUT"
echo "  CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
  "PYPRUNE_COMPILE_CHECK=$PYPRUNE_COMPILE_CHECK"
"$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"

shopt -s nullglob
LIBS=("$OUT"/lib/pyprune/_C*.so)
CU_FILES=(csrc/cuda/*.cu)
if [ "${#LIBS[@]}" -ne 1 ]; then
  echo "check-cuda: expected one built _C library, found ${#LIBS[@]}" >&2
  exit 1
fi
LIB="${LIBS[0]}"
[ "${#CU_FILES[@]}" -gt 0 ] || { echo "check-cuda: no csrc/cuda/*.cu to check" >&2; exit 1; }

# cuobjdump ships with the toolkit; trimmed toolkits lack it, but triton bundles one.
CUOBJDUMP=""
for candidate in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
                 "$SITE/triton/backends/nvidia/bin/cuobjdump"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then CUOBJDUMP="$candidate"; break; fi
done
[ -n "$CUOBJDUMP" ] || { echo "check-cuda: no cuobjdump found to list the built ELFs" >&2; exit 1; }

echo "check-cuda: device code in $(basename "$LIB") ($CUOBJDUMP --list-elf):"
ELF_LIST=$("$CUOBJDUMP" --list-elf "$LIB")
echo "$ELF_LIST"
# nvcc makes one ELF per .cu and architecture, named after the source.
for cu in "${CU_FILES[@]}"; do
  name=$(basename "$cu" .cu)
  for arch in $([ "$TORCH_VERSION" = "$PRIMARY" ] && echo sm_80 sm_90 || echo sm_90); do
    if ! grep -q " ${name}\.${arch}\.cubin\$" <<<"$ELF_LIST"; then
      echo "check-cuda: FAILED: no $arch code for $cu in $(basename "$LIB")" >&2
      exit 1
    fi
  done
done

# +PTX: compute_90 PTX for every source, so GPUs newer than sm_90 can JIT it.
PTX_LIST=$("$CUOBJDUMP" --list-ptx "$LIB")
for cu in "${CU_FILES[@]}"; do
  [ "$TORCH_VERSION" = "$PRIMARY" ] || break
  name=$(basename "$cu" .cu)
  if ! grep -q " ${name}\.sm_90\.ptx\$" <<<"$PTX_LIST"; then
    echo "check-cuda: FAILED: no compute_90 PTX for $cu in $(basename "$LIB")" >&2
    echo "$PTX_LIST" >&2
    exit 1
  fi
done

# Registers and stack per kernel, for review (STACK > 0 means local memory, often spills).
echo "check-cuda: resource usage (arch, REG, STACK bytes, kernel):"
"$CUOBJDUMP" --dump-resource-usage "$LIB" | awk '
  /arch = / { arch = $3 }
  /Function / { name = $2; sub(/:$/, "", name) }
  /REG:/ { split($1, r, ":"); split($2, s, ":"); print arch, r[2], s[2], name }' |
  { if command -v c++filt >/dev/null; then c++filt; else cat; fi } |
  sed -E 's/\(anonymous namespace\):://; s/pyprune:://g; s/\(.*$//' |
  awk '{ printf "  %-6s %4s %4s  %s\n", $1, $2, $3, substr($0, index($0, $4)) }'

# The library must load against this torch and register a CUDA kernel for every schema that a
# csrc/cuda source implements (no GPU needed for either).
"$PY" - "$LIB" <<'EOF'
import importlib.util
import re
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("pyprune._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
ops = sorted({name for cu in Path("csrc/cuda").glob("*.cu")
              for name in re.findall(r'm\.impl\("(\w+)"', cu.read_text())})
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyprune::{op}", "CUDA")]
if missing:
    sys.exit(f"check-cuda: FAILED: no CUDA kernel registered for {missing}")
print(f"check-cuda: CUDA kernels registered for {', '.join(ops)}")
EOF
echo "check-cuda: torch $TORCH_VERSION OK (${#CU_FILES[@]} CUDA source(s), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
)

for version in "${TORCH_VERSIONS[@]}"; do
  check_version "$version"
done
echo "check-cuda: OK for torch ${TORCH_VERSIONS[*]}"
# The stamp make gpu-report reads: torch $PRIMARY's build is checked and current.
if [[ " ${TORCH_VERSIONS[*]} " == *" $PRIMARY "* ]]; then touch "$(out_of "$PRIMARY")/.checked"; fi
