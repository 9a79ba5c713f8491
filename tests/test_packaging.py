"""Packaging (SPEC section 5): the torch version check that guards pyprune._C, and the sdist's
file list. The built wheel itself is installed and smoke-tested by `make package`
(.ci/package.sh)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyprune

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("built, running", [
    ("2.13.0", "2.13.0"),
    ("2.13.0+cpu", "2.13.1"),
    ("2.13.0", "2.13.2+cu130"),
    ("2.14.0a0+git1234", "2.14.1"),
])
def test_same_torch_release_loads(built, running):
    pyprune._check_torch_version(built, running)


@pytest.mark.parametrize("built, running", [
    ("2.13.0+cpu", "2.11.0"),
    ("2.13.0", "2.14.1+cu130"),
    ("2.13.0", "3.13.0"),
])
def test_other_torch_release_names_both_versions(built, running):
    with pytest.raises(ImportError, match=r"built against torch (.|\n)*installed") as error:
        pyprune._check_torch_version(built, running)
    assert built in str(error.value) and running in str(error.value)
    assert "torch==" + ".".join(built.split(".")[:2]) + ".*" in str(error.value)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_import_checks_the_recorded_build_torch():
    # A built package's pyprune/_build_info.py records its build torch; faked here as another
    # release, the import must stop before loading _C.
    major, minor = (int(p) for p in str(torch.__version__).split(".")[:2])
    other = f"{major}.{minor + 1}.0"
    result = run_python(f"""
import sys, types
sys.modules["pyprune._build_info"] = types.SimpleNamespace(TORCH_VERSION={other!r})
try:
    import pyprune
except ImportError as error:
    print("ImportError:", error)
else:
    print("imported")
""")
    assert result.returncode == 0, result.stderr
    assert f"built against torch {other}" in result.stdout, result.stdout
    assert str(torch.__version__) in result.stdout


def sdist_files(tmp_path: Path) -> set[str]:
    """The files `setup.py sdist` would pack (egg_info's SOURCES.txt: MANIFEST.in applied to the
    package files), without building anything."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    lines = (tmp_path / "pyprune.egg-info" / "SOURCES.txt").read_text().splitlines()
    return {line for line in lines if not line.startswith(str(tmp_path))}


def test_sdist_holds_every_source_test_and_build_file(tmp_path):
    files = sdist_files(tmp_path)
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("tests/*.py")}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("triton_kernels/*.py")}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("pyprune/**/*.py")
               if "_build_info" not in p.name}
    wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "pytest.ini"}
    assert {Path(name).suffix for name in wanted} >= {".cu", ".h", ".cpp"}
    assert not wanted - files, f"the sdist lacks {sorted(wanted - files)}"
    assert "pyprune/_build_info.py" not in files
