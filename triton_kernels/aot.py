"""Ahead-of-time compile of every Triton kernel in pyprune.triton_kernels, for sm_80 and sm_90.

    python -m pyprune.triton_kernels.aot [--arch 80 90] [--jobs N]

No GPU is needed: triton.compile lowers each kernel to a cubin for the target through Triton's
bundled ptxas. A kernel that would not build on the GPU machine fails here, in CI.

Each kernel module declares what its launchers can launch in a module-level list
``AOT = [(kernel, signature, constexprs, options), ...]`` (signature and constexprs as
``triton.compiler.ASTSource`` takes them, options as ``triton.compile`` does, e.g. num_warps).
An entry may add a fifth item, the architectures (of ARCHS) whose launches use it, where a
launcher picks its options per architecture (without it an entry serves every architecture),
and a sixth, the pointer arguments that its launches always pass 16-byte aligned (the
launcher's own allocations), compiled with that alignment as the JIT specializes them.
Every ``@triton.jit`` function named ``*_kernel`` must appear there; a kernel without an entry
is reported as a failure, so a new op cannot skip this check by omission.

A variant fails when it does not compile or when its cubin has a stack frame or local memory
(register spills or local arrays: ``cuobjdump --dump-resource-usage``), on any architecture.

A launch specializes every integer argument equal to 1 into a constant (unless the kernel lists
it in ``do_not_specialize``): the kernel then sees a Python int where it was written for a
tensor (``L.to(...)`` fails to compile; a loop-carried variable changes type). The interpreter
never specializes, so each variant is also compiled for sm_90 with all of those arguments 1
("ones" in the report): a kernel must compile for any of them being 1.
Prints one line per variant and architecture; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

ARCHS = (80, 90)
PACKAGE = "pyprune.triton_kernels"


class Variant(NamedTuple):
    module: str
    kernel: Any
    signature: dict
    constexprs: dict
    options: dict
    archs: tuple = ARCHS  # the architectures whose launches use this variant
    # Pointer arguments whose launches always pass 16-byte aligned memory (a launcher's own
    # fresh allocations): compiled as the JIT specializes such a launch (tt.divisibility 16).
    aligned: tuple = ()

    def describe(self) -> str:
        dtype = next((t[1:] for t in self.signature.values() if t.startswith("*")), "-")
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.module}.{self.kernel.__name__} {dtype} {consts} {opts}".rstrip()


def signature(kernel, dtype: str, constexprs: dict, pointers: dict | None = None) -> dict[str, str]:
    """The signature a launch with ``dtype`` tensors gets, for a kernel module's AOT list:
    constexprs as such, arguments that ``pointers`` names with the type it gives (a pointer's
    element type, or fp32 for a float argument), other ``*_ptr`` arguments as pointers to
    dtype, every other argument i32 (launch values fit; kernels widen offsets to int64)."""
    pointers = pointers or {}

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in pointers:
            return pointers[name]
        if name.endswith("_ptr"):
            return f"*{dtype}"
        return "i32"

    return {name: kind(name) for name in kernel.arg_names}


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "AOT compilation needs compiled (not interpreted) kernels: unset TRITON_INTERPRET"
        )


def kernel_modules() -> list[str]:
    """Names of the kernel modules of this package (every module but this one)."""
    package = importlib.import_module(PACKAGE)
    return sorted(
        f"{PACKAGE}.{m.name}"
        for m in pkgutil.iter_modules(package.__path__)
        if not m.ispkg and m.name != "aot" and not m.name.startswith("_")
    )


def variants() -> tuple[list[Variant], list[str]]:
    """Every registered variant, and the ``*_kernel`` functions that have none."""
    _check_not_interpreted()
    from triton.runtime.jit import JITFunction

    found, missing = [], []
    for name in kernel_modules():
        module = importlib.import_module(name)
        short = name.rpartition(".")[2]
        entries = [Variant(short, *entry) for entry in getattr(module, "AOT", [])]
        covered = {id(v.kernel) for v in entries}
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel") and id(value) not in covered:
                missing.append(f"{short}.{attr}")
        found += entries
    return found, missing


def with_ones(variant: Variant) -> Variant:
    """The variant as a launch with every specializable integer argument equal to 1 compiles it
    (those arguments become constexpr 1)."""
    params = {p.name: p for p in variant.kernel.params}
    ones = {name: 1 for name, kind in variant.signature.items()
            if kind in ("i32", "i64") and not params[name].do_not_specialize}
    signature = {name: "constexpr" if name in ones else kind
                 for name, kind in variant.signature.items()}
    return variant._replace(signature=signature, constexprs={**variant.constexprs, **ones})


def compile_variant(variant: Variant, arch: int):
    """triton.compile of one variant for sm_<arch>; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(variant.kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in variant.aligned}
    src = ASTSource(variant.kernel, variant.signature, variant.constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{variant.describe()}: no cubin produced for sm_{arch}")
    return compiled


def cubin_resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack frame bytes, local memory bytes) of a one-kernel cubin, from
    ``cuobjdump --dump-resource-usage`` (the CUDA toolkit's, else the one triton bundles)."""
    import re
    import shutil
    import subprocess
    import tempfile

    import triton

    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or "",
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")]
    tool = next((p for p in candidates if os.path.isfile(p) and os.access(p, os.X_OK)), None)
    if tool is None:
        raise FileNotFoundError("no cuobjdump: install the CUDA toolkit or triton")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


# (variant index, arch, ones): ones compiles the variant with_ones, checked for compiling only.
Job = tuple[int, int, bool]


def _compile_one(job: Job) -> tuple[int, int, bool, str | None, float]:
    index, arch, ones = job
    variant = variants()[0][index]
    start = time.perf_counter()
    try:
        compiled = compile_variant(with_ones(variant) if ones else variant, arch)
        regs, stack, local = cubin_resources(compiled.asm["cubin"])
        error = None
        if (stack or local) and not ones:
            error = (f"{variant.describe()}: spills on sm_{arch}: {stack} B stack frame, "
                     f"{local} B local memory ({regs} registers)\n")
    except Exception:  # noqa: BLE001 - every failure is reported, none stops the run
        error = traceback.format_exc()
    return index, arch, ones, error, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="CUDA compute capabilities as integers (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compile processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        found, missing = variants()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    for name in missing:
        print(f"FAIL  {name}: no entry in its module's AOT list", flush=True)

    jobs = [(i, arch, False) for arch in args.arch for i in range(len(found))
            if arch in found[i].archs]
    if 90 in args.arch:
        jobs += [(i, 90, True) for i in range(len(found)) if 90 in found[i].archs]
    start = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        # Workers find the function by its module's import name; under `python -m` this
        # module is __main__, which they cannot import.
        worker = importlib.import_module(f"{PACKAGE}.aot")._compile_one
        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            failed = _report(found, pool.map(worker, jobs))
    else:
        failed = _report(found, map(_compile_one, jobs))
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"{len(jobs) - failed}/{len(jobs)} kernel variants compiled for {archs} in "
          f"{time.perf_counter() - start:.1f} s; {failed} failed, {len(missing)} kernels unregistered",
          flush=True)
    return 1 if failed or missing else 0


def _report(found: list[Variant], results) -> int:
    failures = 0
    for index, arch, ones, error, seconds in results:
        status = "ok  " if error is None else "FAIL"
        what = f"sm_{arch} ones" if ones else f"sm_{arch}"
        print(f"{status}  {what}  {found[index].describe()}  ({seconds:.2f} s)", flush=True)
        if error is not None:
            failures += 1
            print(error, file=sys.stderr, flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
