#!/usr/bin/env bash
# make package: the install a user makes, checked end to end (SPEC section 5, Packaging).
#   1. the sdist, then a wheel built from that sdist (python -m build, no isolation: the wheel is
#      built against .venv's torch, whose release it then requires);
#   2. the sdist holds every tracked source, test and benchmark file; the wheel's tags and its
#      torch requirement are the ones setup.py promises;
#   3. a fresh venv gets the build torch (from local disk) and the wheel with its [triton] extra;
#   4. a smoke test from a temporary directory outside the source tree: pyprune imports from the
#      venv, each op once on the CPU against pyprune.reference, the Triton backend under
#      TRITON_INTERPRET=1, and the torch version check on a faked mismatch.
# The wheel build compiles every C++ unit anew (about 4 minutes with MAX_JOBS=2 on 2 cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/build/package"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$SECONDS

rm -rf "$OUT" && mkdir -p "$OUT/dist"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== package: sdist, then a wheel from the sdist (MAX_JOBS=$MAX_JOBS)"
"$PY" -m build --no-isolation --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 || {
  tail -n 60 "$OUT/build.log" >&2
  echo "package: FAILED to build (log: $OUT/build.log)" >&2; exit 1; }
if grep -n "Py_LIMITED_API.*redefined" "$OUT/build.log"; then
  echo "package: FAILED: Py_LIMITED_API is defined twice" >&2; exit 1
fi
SDIST=("$OUT"/dist/*.tar.gz)
WHEEL=("$OUT"/dist/*.whl)
[ "${#SDIST[@]}" -eq 1 ] && [ "${#WHEEL[@]}" -eq 1 ] || {
  echo "package: expected one sdist and one wheel in $OUT/dist" >&2; ls "$OUT/dist" >&2; exit 1; }
echo "package: $(basename "${SDIST[0]}") ($(du -k "${SDIST[0]}" | cut -f1) KB)," \
  "$(basename "${WHEEL[0]}")"

echo "== package: contents, tags and requirements"
git ls-files -- csrc tests benchmarks/*.py pyprune triton_kernels pyproject.toml setup.py \
  MANIFEST.in README.md >"$WORK/tracked"
"$PY" - "${SDIST[0]}" "${WHEEL[0]}" "$WORK/tracked" <<'EOF'
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

sdist, wheel, tracked = sys.argv[1:]
with tarfile.open(sdist) as tar:
    # pyprune-0.1.0/csrc/ops.cpp -> csrc/ops.cpp
    members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
# Untracked files (work in progress of others) are not checked; every tracked one must ship.
wanted = {line for line in Path(tracked).read_text().splitlines() if Path(line).exists()}
missing = sorted(wanted - members)
assert not missing, f"the sdist lacks {missing}"
assert "pyprune/_build_info.py" not in members, "the sdist carries a build's _build_info.py"

major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
name = Path(wheel).name
assert re.fullmatch(r"pyprune-[^-]+-cp310-abi3-linux_x86_64\.whl", name), name
with zipfile.ZipFile(wheel) as whl:
    files = set(whl.namelist())
    meta = next(f for f in files if f.endswith(".dist-info/METADATA"))
    metadata = whl.read(meta).decode()
    info = whl.read("pyprune/_build_info.py").decode()
for needed in ["pyprune/_C.abi3.so", "pyprune/triton_kernels/kwta.py", "pyprune/ops/__init__.py",
               "pyprune/nn/__init__.py"]:
    assert needed in files, f"the wheel lacks {needed}"
requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
assert requires == [f"Requires-Dist: torch=={major}.{minor}.*"], requires
assert "Requires-Python: >=3.10" in metadata
assert f"TORCH_VERSION = {str(torch.__version__)!r}" in info, info
print(f"package: sdist has all {len(wanted)} tracked files; wheel {name}: {requires[0]}")
EOF

BUILD_TORCH="$("$PY" -c 'import torch; print(torch.__version__)')"
echo "== package: fresh venv with torch $BUILD_TORCH and the wheel"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# pip's "Location ... is ignored" lines are about the local mirror's layout, not this install.
quiet_pip() { "$VPY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# The exact build torch first (its CPU build lies on local disk), so that the wheel's
# requirement is checked against it rather than satisfied by some other 2.x download.
quiet_pip "torch==$BUILD_TORCH"
# The extras [triton] (held at the version the project tests, as requirements.txt does) and
# [test] (numpy, which triton's CPU interpreter imports).
quiet_pip "${WHEEL[0]}[triton,test]" "triton==3.6.0"
"$VPY" -m pip check
"$VPY" - "$BUILD_TORCH" <<'EOF'
import sys
import torch
assert str(torch.__version__) == sys.argv[1], f"the wheel changed torch: {torch.__version__}"
EOF

echo "== package: smoke test outside the source tree"
mkdir "$WORK/smoke"
cat >"$WORK/smoke/smoke.py" <<'EOF'
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import pyprune
import pyprune.triton_kernels
from pyprune import _build_info, reference

site = Path(sysconfig.get_paths()["purelib"]).resolve()
here = Path(pyprune.__file__).resolve().parent
assert here == site / "pyprune", f"pyprune came from {here}, not {site}"
assert Path(pyprune.triton_kernels.__file__).resolve().parent == here / "triton_kernels"
assert _build_info.TORCH_VERSION == str(torch.__version__)

gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 8, 5, 7, dtype=torch.float64, generator=gen)
with pyprune.use_backend("cpu"):
    assert torch.equal(pyprune.kwta(x, k=9, mode="channel"), reference.kwta(x, 9, "channel"))

    w = torch.randn(3, 8, dtype=torch.float64, generator=gen)
    b = torch.randn(3, dtype=torch.float64, generator=gen)
    label = torch.tensor([0, 2, 1, 2])
    for got, want in zip(pyprune.cas(x, w, b, label), reference.cas(x, w, b, label)):
        torch.testing.assert_close(got, want)

    weight = torch.randn(6, 8, 3, 3, dtype=torch.float64, generator=gen)
    in_mask = torch.rand(8, generator=gen) < 0.5
    out_mask = torch.rand(4, 6, generator=gen) < 0.5
    torch.testing.assert_close(
        pyprune.masked_conv2d(x, weight, None, 1, 1, in_mask=in_mask, out_mask=out_mask),
        reference.masked_conv2d(x, weight, None, 1, 1, in_mask=in_mask, out_mask=out_mask))

    assert torch.equal(pyprune.magnitude_mask(weight, 0.3), reference.magnitude_mask(weight, 0.3))

    # Random ops: the kept entries are x / q of the reference's keep probabilities; the noise has
    # the asked spread (std 0.5 of 11200 draws: the estimate's error is about 0.0033).
    r = x[0].numel() // 2
    out = pyprune.sap(x, samples=r, generator=gen)
    kept = out != 0
    assert kept.flatten(1).sum(1).min() >= 1 and kept.flatten(1).sum(1).max() <= r
    q = reference.sap_keep_probability(x, r)
    torch.testing.assert_close(out[kept], (x / q)[kept])
    xs = x.repeat(10, 1, 1, 1)
    noise = pyprune.gaussian_noise(xs, 0.5, generator=gen) - xs
    assert abs(float(noise.std()) - 0.5) < 0.02, float(noise.std())

# The Triton backend on the CPU: the interpreter is chosen before triton is imported.
triton_check = """
import torch, pyprune
from pyprune import reference
x = torch.randn(3, 40, dtype=torch.float32)
with pyprune.use_backend("triton"):
    assert torch.equal(pyprune.kwta(x, k=5), reference.kwta(x, 5))
print("triton kwta ok")
"""
subprocess.run([sys.executable, "-c", triton_check], check=True,
               env={**os.environ, "TRITON_INTERPRET": "1"})

# The torch check: a release other than the build's fails the import, naming both versions;
# another patch release or local build of the same release passes.
built = _build_info.TORCH_VERSION
major, minor = (int(p) for p in built.split("+")[0].split(".")[:2])
other = f"{major}.{minor - 1}.0"
pyprune._check_torch_version(built, f"{major}.{minor}.99+cu999")
mismatch = f"""
import torch
torch.__version__ = {other!r}
try:
    import pyprune
except ImportError as error:
    print(error)
    assert {built!r} in str(error) and {other!r} in str(error), error
else:
    raise SystemExit("pyprune imported under a faked torch {other}")
"""
subprocess.run([sys.executable, "-c", mismatch], check=True)
print(f"smoke test passed: pyprune {pyprune.__version__} (built with torch {built}) from {here}")
EOF
(cd "$WORK/smoke" && env -u PYTHONPATH "$VPY" smoke.py)
echo "package: passed in $((SECONDS - start)) s (sdist and wheel in $OUT/dist)"
