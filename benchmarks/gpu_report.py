"""``make gpu-report``: the sm_90 resource table of every CUDA and Triton kernel variant.

    python -m benchmarks.gpu_report [--lib PATH] [--out DIR] [--jobs N]

No GPU is needed (SPEC section 5). For every CUDA kernel instantiation in the library that
``make check-cuda`` builds (build/check-cuda/lib/pyprune/_C*.so) and every Triton variant in
the kernel modules' ``AOT`` lists (compiled for sm_90 by pyprune.triton_kernels.aot), it lists
registers, stack frame and local memory, shared memory (static from the ELF, dynamic where the
launch sets it), threads per block and the theoretical occupancy on sm_90, with the benchmark
cases that launch the variant. Writes ``<out>/sm_90-resources.md`` and ``.csv``.

Where the numbers come from:
  * registers, stack frame (spills and local arrays: Triton's ``n_spills`` is this / 4), local
    and static shared memory: ``cuobjdump --dump-resource-usage`` of the cubin;
  * threads per block: the ELF attribute that ``__launch_bounds__(N)`` (EIATTR_MAX_THREADS) or
    Triton's ``.reqntid`` (EIATTR_REQNTID) leaves. Every CUDA kernel must declare one, and its
    launch sites must pass that same expression as the block size (checked in the sources
    below), so the launch bound is the block size of every instantiation;
  * dynamic shared memory: Triton's ``metadata.shared``; for CUDA, ``DYNAMIC_SMEM`` below;
  * occupancy: the model of CUDA's cuda_occupancy.h for sm_90 (``SM90``, ``occupancy``).

Spills on sm_80 as well: the CUDA library's sm_80 instantiations are read the same way and any
stack frame or local memory there is a problem too; the Triton variants launched on sm_80 are
checked by the AOT compile (pyprune.triton_kernels.aot fails a variant whose cubin has a stack
frame or local memory, on each architecture of its entry), and the table lists the variants
whose entries serve sm_90.

Exits 1 when a variant has a stack frame or local memory, when its occupancy is below 25% and
``JUSTIFIED`` does not say why that is fine, when a CUDA kernel has no launch bound or a launch
site disagrees with it, when a benchmark launches a Triton variant that no AOT list holds, or
when the roofline's instructions a K-loop step of the convolution kernels (CUDA_TC_STEP_OPS,
TRITON_CONV_STEP_OPS, TRITON_CONV_PACKED_STEP_OPS in benchmarks/roofline.py) differ from their
SASS by more than STEP_OPS_TOLERANCE (``step_instructions``: the innermost loop holding a global
load and a tensor-core instruction), or when a Triton variant's innermost loop of asynchronous
copies waits for all of them each trip (``pipeline_drains``).
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIB_GLOB = "build/check-cuda/lib/pyprune/_C*.so"
ARCH = 90
MIN_OCCUPANCY = 0.25


# ----------------------------------------------------------------------------- occupancy model


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability, as cuda_occupancy.h models them."""

    name: str
    regs_per_sm: int
    regs_per_block: int
    max_warps_per_sm: int  # 2048 threads
    max_blocks_per_sm: int
    smem_per_sm: int  # the largest shared-memory carveout
    smem_per_block: int  # the opt-in maximum a block may use
    reserved_smem_per_block: int  # the driver's reservation, added to every block
    smem_granularity: int
    reg_granularity: int  # registers are allocated per warp in units of this
    max_regs_per_thread: int
    sub_partitions: int  # registers are split evenly between the SM's sub-partitions


SM90 = Arch(name="sm_90", regs_per_sm=65536, regs_per_block=65536, max_warps_per_sm=64,
            max_blocks_per_sm=32, smem_per_sm=228 * 1024,
            smem_per_block=227 * 1024, reserved_smem_per_block=1024, smem_granularity=128,
            reg_granularity=256, max_regs_per_thread=255, sub_partitions=4)


@dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / max_warps_per_sm
    limiter: str  # what bounds `blocks`: warps, blocks, registers or shared memory
    smem_per_block: int  # shared memory allocated per block, reservation included


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, threads: int, smem: int, arch: Arch = SM90) -> Occupancy:
    """Theoretical occupancy of blocks of ``threads`` threads using ``regs`` registers per
    thread and ``smem`` bytes of shared memory (static + dynamic, without the driver's
    reservation). A block that cannot launch at all has 0 blocks."""
    if threads < 1 or threads > 1024:
        raise ValueError(f"threads per block must be in [1, 1024], got {threads}")
    warps = -(-threads // 32)
    limits = {"warps": arch.max_warps_per_sm // warps, "blocks": arch.max_blocks_per_sm}

    regs_per_warp = _round_up(regs * 32, arch.reg_granularity)
    if regs > arch.max_regs_per_thread or \
            regs_per_warp * _round_up(warps, arch.sub_partitions) > arch.regs_per_block:
        limits["registers"] = 0
    elif regs_per_warp:
        per_partition = (arch.regs_per_sm // arch.sub_partitions) // regs_per_warp
        limits["registers"] = per_partition * arch.sub_partitions // warps

    smem_block = _round_up(smem + arch.reserved_smem_per_block, arch.smem_granularity)
    if smem_block > arch.smem_per_block + arch.reserved_smem_per_block:
        limits["shared memory"] = 0
    else:
        limits["shared memory"] = arch.smem_per_sm // smem_block

    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * warps, blocks * warps / arch.max_warps_per_sm, limiter,
                     smem_block)


# ---------------------------------------------------------------------------- what is fine

# Variants whose theoretical occupancy below MIN_OCCUPANCY is fine, and why. Keys are regular
# expressions matched (re.search) against "<kind> <kernel> <dtype> <config>" of a row.
JUSTIFIED: dict[str, str] = {
    r"^triton sap\._sap_merge_kernel \w+ E=1024 DT=256 W=128 STORED=False ": (
        "the exact merge that makes the draws again, launched only where r > 4 L (r = L, the "
        "default and the benchmarks', reads them back: STORED=True, 128 registers, 25%); its "
        "draw tile holds a Philox state, four spacings, four running sums and four search "
        "pointers a thread and spills at 128 registers in the strided launch, so 136: 3 warps "
        "a scheduler, each with four independent 10-step searches in flight"),
    r"^cuda kwta_warp_kernel<double, ": (
        "float64 only, which pyprune's cuda backend does not take (float64 runs the reference): "
        "only a direct torch.ops.pyprune.kwta call on a float64 CUDA tensor launches it. A warp "
        "holds a group of up to 1024 keys in registers, 32 per lane, and 64-bit keys take twice "
        "the registers of float32's (120-168: 12.5-25%; capped at 128 it spilled)"),
}

# Dynamic shared memory of CUDA kernels (bytes; the most any launch of it sets), by a regular
# expression on the kernel's name and template arguments; kernels absent here set none.
DYNAMIC_SMEM: dict[str, int] = {
    # kwta.cu launch_block: one histogram (kHistBytes) and the candidates (kCandBytes) ...
    r"^kwta_block_kernel<.*, 256, ": 8192 + 24576,
    # ... or, in a cluster launch (512 threads only), three histograms and kClusterCandBytes.
    r"^kwta_block_kernel<.*, 512, ": 3 * 8192 + 16384,
    # cas.cu launch_logits: the K channel means (acc_t) of its R samples: the benchmarks'
    # largest K, 2048 (more channels take more; R = 4 only while 4 samples fit in 48 KiB).
    r"^cas_logits_kernel<double, \w+, 4>": 4 * 1536 * 8,
    r"^cas_logits_kernel<double": 2048 * 8,
    r"^cas_logits_kernel<[^,]+, \w+, 4>": 4 * 2048 * 4,
    r"^cas_logits_kernel<": 2048 * 4,
    # masked_conv.cu launch_tc: two stages of W' (64 x 72) and X' (64 x 40) tiles.
    r"^masked_conv2d_tc_kernel<float>": 2 * 4 * (64 * 72 + 64 * 40),
    r"^masked_conv2d_tc_kernel<": 2 * 2 * (64 * 72 + 64 * 40),
    # masked_conv.cu launch_packed, at row pitches of 144 (float32) and 80 (16-bit) bytes: per
    # tap, four stages of W' and X' tiles (96 rows in all: 64 + 32 or 32 + 64); patch tiles,
    # four stages of the W' rows and two patch buffers of the benchmarks' largest patch, 144
    # pixels (32 x 512 x 4 x 4: 4 samples' 24 padded rows of 6).
    r"^masked_conv2d_tc_packed_kernel<float, \d+, false>": 4 * 96 * 144,
    r"^masked_conv2d_tc_packed_kernel<[^,]+, \d+, false>": 4 * 96 * 80,
    r"^masked_conv2d_tc_packed_kernel<float, 32, true>": 4 * 32 * 144 + 2 * 144 * 144,
    r"^masked_conv2d_tc_packed_kernel<float, 64, true>": 4 * 64 * 144 + 2 * 144 * 144,
    r"^masked_conv2d_tc_packed_kernel<[^,]+, 32, true>": 4 * 32 * 80 + 2 * 144 * 80,
    r"^masked_conv2d_tc_packed_kernel<[^,]+, 64, true>": 4 * 64 * 80 + 2 * 144 * 80,
    # masked_conv.cu static_forward_cuda: an int per output channel (the kept rank); the
    # benchmarks' largest C_out, 512.
    r"^scatter_kept_channels_kernel<": 512 * 4,
}


# ------------------------------------------------------------------------------- the variants


@dataclass
class Variant:
    kind: str  # "cuda" or "triton"
    kernel: str
    dtype: str
    config: str
    threads: int
    regs: int
    stack: int
    local: int
    static_smem: int
    dynamic_smem: int
    used_by: list[str] = field(default_factory=list)
    step_ops: int | None = None  # lane instructions a thread of a GEMM K-loop step (SASS)
    # A GATED masked-convolution variant's dense body's step (step_ops: its block-sparse one).
    dense_step_ops: int | None = None
    loop_ops: tuple[int, int] | None = None  # loop_instructions of its SASS
    draw_ops: int | None = None  # draw_loop_instructions of its SASS
    occ: Occupancy | None = None
    why_fine: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind} {self.kernel} {self.dtype} {self.config}".rstrip()


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump ($CUDA_HOME, then PATH), else the one triton bundles."""
    import triton

    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or "",
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no cuobjdump: install the CUDA toolkit or triton")


def _run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict[str, tuple[int, int, int, int]]:
    """{mangled name: (registers, stack frame, static shared, local)} from
    ``cuobjdump --dump-resource-usage`` of one architecture."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in _RES.finditer(text)}


_BLOCK_ATTRS = ("EIATTR_MAX_THREADS", "EIATTR_REQNTID")


def parse_block_sizes(text: str) -> dict[str, int]:
    """{mangled name: threads per block} from ``cuobjdump -elf``: EIATTR_MAX_THREADS (from
    __launch_bounds__ / .maxntid) or EIATTR_REQNTID (.reqntid), x * y * z."""
    sizes, kernel, attr = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(".nv.info."):
            kernel = line[len(".nv.info."):]
        elif line.startswith("Attribute:"):
            attr = line.split()[1]
        elif line.startswith("Value:") and kernel and attr in _BLOCK_ATTRS:
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            sizes[kernel] = x * y * z
    return sizes


def demangle(names: Iterable[str]) -> dict[str, str]:
    """{mangled: demangled} by c++filt (names stay mangled without it)."""
    names = list(names)
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True,
                         text=True).stdout.splitlines()
    return dict(zip(names, out))


_DTYPES = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def _short(demangled: str) -> tuple[str, str, str]:
    """(kernel<args>, dtype, rest of the template arguments) of a demangled kernel name."""
    name = re.sub(r"\(anonymous namespace\)::|pyprune::|^void ", "", demangled)
    name = name.split("(", 1)[0]
    m = re.match(r"(\w+)<(.*)>$", name)
    if not m:
        return name, "-", ""
    args = [a.strip() for a in re.split(r",(?![^<]*>)", m[2])]
    dtype = _DTYPES.get(args[0], args[0])
    short = lambda t: t.replace("unsigned long", "u64").replace("unsigned int", "u32")  # noqa: E731
    return short(name), dtype, ", ".join(short(a) for a in args[1:])


def cuda_variants(lib: Path) -> list[Variant]:
    tool = cuobjdump()
    arch = ["-arch", f"sm_{ARCH}", str(lib)]
    res = parse_resource_usage(_run([tool, "--dump-resource-usage", *arch]))
    sizes = parse_block_sizes(_run([tool, "-elf", *arch]))
    if not res:
        raise RuntimeError(f"{lib}: no sm_{ARCH} kernels (is it the make check-cuda build?)")
    names = demangle(res)
    variants = []
    for mangled, (regs, stack, smem, local) in sorted(res.items(), key=lambda kv: names[kv[0]]):
        kernel, dtype, config = _short(names[mangled])
        dynamic = next((b for pattern, b in DYNAMIC_SMEM.items() if re.search(pattern, kernel)), 0)
        v = Variant("cuda", kernel, dtype, config, sizes.get(mangled, 0), regs, stack, local, smem,
                    dynamic)
        if mangled not in sizes:
            v.problems.append("no __launch_bounds__ (no EIATTR_MAX_THREADS in the ELF)")
        variants.append(v)
    return variants


SPILL_ARCHS = (80,)  # further architectures whose CUDA instantiations must not spill


def cuda_spills(lib: Path, arch: int) -> list[str]:
    """A problem for each CUDA kernel instantiation of the library that has a stack frame or
    local memory on sm_<arch>."""
    res = parse_resource_usage(_run([cuobjdump(), "--dump-resource-usage", "-arch",
                                     f"sm_{arch}", str(lib)]))
    if not res:
        return [f"{lib}: no sm_{arch} kernels (is it the make check-cuda build?)"]
    names = demangle(res)
    problems = []
    for mangled, (regs, stack, _, local) in sorted(res.items(), key=lambda kv: names[kv[0]]):
        if stack or local:
            kernel, dtype, config = _short(names[mangled])
            problems.append(f"sm_{arch}: cuda {kernel} {dtype} {config}".rstrip()
                            + f": {stack} B stack frame, {local} B local memory ({regs} registers)")
    return problems


# ---------------------------------------------------------------- launch bounds in the sources

# A kernel, with the first argument of its __launch_bounds__ if it has one.
_KERNEL = re.compile(r"__global__\s+void\s+"
                     r"(?:__launch_bounds__\(\s*([^,()]+?)\s*"
                     r"(?:,(?:[^()]|\((?:[^()]|\([^()]*\))*\))*)?\)\s*)?"
                     r"(\w+)\s*\(")
# `auto kernel = some_kernel<...>;`
_ALIAS = re.compile(r"\bauto\s+(\w+)\s*=\s*(\w+)\s*<")
# `callee<template args><<<grid, block, ...>>>`
_ARG = r"((?:[^,()<>]|<[^<>]*>|\((?:[^()]|\([^()]*\))*\))+?)"  # an argument, nested once or twice
_LAUNCH = re.compile(rf"\b(\w+)\s*(?:<[^;{{}}]*?>)?\s*<<<\s*{_ARG},\s*{_ARG}\s*[,>]")
# `callee<template args><<<grid, block, smem` with a dynamic shared memory size other than 0
_LAUNCH_SMEM = re.compile(rf"\b(\w+)\s*(?:<[^;{{}}]*?>)?\s*<<<\s*{_ARG},\s*{_ARG},\s*{_ARG}\s*[,>]")
# `config.blockDim = dim3(block); ... cudaLaunchKernelEx(&config, callee, ...)`
_LAUNCH_EX = re.compile(r"blockDim\s*=\s*dim3\(\s*([^)]+?)\s*\)[^;]*;(?:.|\n)*?"
                        r"cudaLaunchKernelEx\(\s*&\w+\s*,\s*(\w+)")
# `launch_clusters(callee, grid, block, smem, ...)` (csrc/cuda/cluster.cuh)
_LAUNCH_CLUSTERS = re.compile(rf"\blaunch_clusters\(\s*(\w+)\s*,\s*{_ARG},\s*{_ARG},\s*{_ARG}\s*,")


def check_launch_bounds(sources: Iterable[Path]) -> list[str]:
    """Problems with the launch bounds of the CUDA kernels in ``sources``: a kernel without
    __launch_bounds__, or a launch whose block size is not its kernel's launch-bound
    expression (textually: both name the same constant or template parameter). A launch through
    a variable that is no `auto v = kernel<...>` alias (a lambda's parameter) is checked
    against every kernel of the file that is not launched by name."""
    problems = []
    for path in sources:
        text = re.sub(r"//[^\n]*", "", path.read_text())
        bounds = {}
        for m in _KERNEL.finditer(text):
            if m[1] is None:
                problems.append(f"{path.name}: kernel {m[2]} has no __launch_bounds__")
            else:
                bounds[m[2]] = m[1]
        aliases = dict(_ALIAS.findall(text))
        launches = [(m[1], m[3]) for m in _LAUNCH.finditer(text)]
        launches += [(m[2], m[1]) for m in _LAUNCH_EX.finditer(text)]
        launches += [(m[1], m[3]) for m in _LAUNCH_CLUSTERS.finditer(text)]
        named = {aliases.get(callee, callee) for callee, _ in launches}
        indirect = [k for k in bounds if k not in named]
        launched = set()
        for callee, block in launches:
            kernel = aliases.get(callee, callee)
            kernels = [kernel] if kernel in bounds else indirect
            if not kernels:
                problems.append(f"{path.name}: launch of {callee} (block {block}): unknown kernel")
            for k in kernels:
                launched.add(k)
                if block != bounds[k]:
                    problems.append(f"{path.name}: {k} is launched with {block} threads but its "
                                    f"__launch_bounds__ is {bounds[k]}")
        problems += [f"{path.name}: kernel {k} is never launched here"
                     for k in bounds if k not in launched]
    return problems


def dynamic_smem_kernels(sources: Iterable[Path]) -> set[str]:
    """Kernels of ``sources`` launched with dynamic shared memory (a `<<<...>>>` or
    launch_clusters size other than 0, or a cudaLaunchKernelEx config); launches through a
    variable count for every kernel of the file that no launch names."""
    found = set()
    for path in sources:
        text = re.sub(r"//[^\n]*", "", path.read_text())
        kernels = {m[2] for m in _KERNEL.finditer(text)}
        aliases = dict(_ALIAS.findall(text))
        named = {aliases.get(m[1], m[1]) for m in _LAUNCH.finditer(text)}
        named |= {aliases.get(m[2], m[2]) for m in _LAUNCH_EX.finditer(text)}
        named |= {aliases.get(m[1], m[1]) for m in _LAUNCH_CLUSTERS.finditer(text)}
        callees = [m[1] for m in _LAUNCH_SMEM.finditer(text) if m[4] != "0"]
        callees += [m[2] for m in _LAUNCH_EX.finditer(text)]
        callees += [m[1] for m in _LAUNCH_CLUSTERS.finditer(text) if m[4] != "0"]
        for callee in callees:
            kernel = aliases.get(callee, callee)
            found |= {kernel} if kernel in kernels else kernels - named
    return found


# ------------------------------------------------------------- instructions of a K-loop step

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b(?:\s+!?U?P\d+,)?\s+(?:`\([^)]*\)\s+)?0x([0-9a-f]+)")


def sass_functions(text: str) -> dict[str, list[str]]:
    """{mangled name: its SASS instructions in order} of ``cuobjdump -sass`` output."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2)))
    return {name: body for name, body in functions.items()}


def _loops(body: list) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop (a backward branch) of a SASS body."""
    at = {address: i for i, (address, _) in enumerate(body)}
    loops = []
    for i, (address, ins) in enumerate(body):
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < address and int(m.group(1), 16) in at:
            loops.append((at[int(m.group(1), 16)], i))
    return loops


def _holds(body: list, loop: tuple[int, int], *ops: str) -> bool:
    """Whether the loop (first, last) of a SASS body holds an instruction naming one of ops."""
    return any(any(op in ins for op in ops) for _, ins in body[loop[0]:loop[1] + 1])


def _step_loop(body: list) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """A GEMM's K-loop step in SASS: the innermost loop (a backward branch) that holds both a
    global load (LDG / LDGSTS) and a tensor-core instruction, None without one; and every loop,
    shortest first."""
    loops = sorted(_loops(body), key=lambda loop: loop[1] - loop[0])
    step = next((l for l in loops if _holds(body, l, "MMA") and _holds(body, l, "LDG")), None)
    return step, loops


def gated_step_instructions(body: list) -> tuple[int | None, int | None]:
    """(block-sparse step, dense step) of a GATED masked-convolution variant's SASS, which holds
    both bodies: the block-sparse K-loop step is the innermost loop with a global load and a
    tensor-core instruction that lies inside another tensor-core loop (its group of block-list
    entries), the dense one such a loop inside none; lane instructions a thread of one trip
    each, None where there is no such loop."""
    loops = _loops(body)
    mma = [l for l in loops if _holds(body, l, "MMA")]
    steps = [l for l in mma if _holds(body, l, "LDG")
             and not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in mma)]

    def size(nested: bool) -> int | None:
        found = [l for l in steps
                 if any(o != l and o[0] <= l[0] and l[1] <= o[1] for o in mma) == nested]
        return found[0][1] - found[0][0] + 1 if len(found) == 1 else None

    return size(True), size(False)


def step_instructions(body: list, trips: int = 1) -> int | None:
    """Lane instructions a thread of one step of a GEMM's K loop in SASS (_step_loop), plus
    (trips - 1) times the innermost loop inside it that holds the tensor-core instructions (a
    step whose mma runs as an inner loop of `trips` iterations); None without such a loop."""
    step, loops = _step_loop(body)
    if step is None:
        return None
    inner = next(l for l in loops
                 if _holds(body, l, "MMA") and step[0] <= l[0] and l[1] <= step[1])
    return (step[1] - step[0] + 1) + (trips - 1) * (inner[1] - inner[0] + 1)


_BSSY = re.compile(r"\bBSSY\s+B\d+,\s+0x([0-9a-f]+)")


def branch_copy_loops(body: list) -> list[tuple[int, int]] | None:
    """The loops of asynchronous copies (LDGSTS, no tensor-core instruction) that a GEMM's K-loop
    step (as step_instructions finds it) runs under a branch, e.g. the packed convolution's
    patch copies at a chunk's first step: (instructions of the branch, from its BSSY to the
    reconvergence point it names, and of the loop) for each; None without such a step."""
    step, loops = _step_loop(body)
    if step is None:
        return None
    at = {address: i for i, (address, _) in enumerate(body)}
    found = []
    for loop in loops:
        if (loop == step or not (step[0] < loop[0] and loop[1] < step[1])
                or _holds(body, loop, "MMA") or not _holds(body, loop, "LDGSTS")):
            continue
        for i in range(loop[0] - 1, step[0] - 1, -1):
            m = _BSSY.search(body[i][1])
            if m and at.get(int(m.group(1), 16), -1) > loop[1]:
                found.append((at[int(m.group(1), 16)] - i + 1, loop[1] - loop[0] + 1))
                break
    return found


def pipeline_drains(body: list) -> bool:
    """Whether an innermost loop that copies global memory to shared memory asynchronously
    (LDGSTS) waits in each trip for every copy in flight (DEPBAR.LE SB0, 0x0): its pipeline
    then drains every trip, and no later step's loads overlap this one's work (a load address
    that depends on another load of the same step does this to Triton's pipeliner)."""
    copying = [loop for loop in _loops(body) if _holds(body, loop, "LDGSTS")]
    innermost = [a for a in copying
                 if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in copying)]
    return any(_holds(body, loop, "DEPBAR.LE SB0, 0x0") for loop in innermost)


def loop_instructions(body: list) -> tuple[int, int] | None:
    """(instructions of the shortest loop, every other instruction) of a kernel's SASS, a
    thread's count of one trip and of the straight-line rest (what a pass loop's kernel issues
    is loop * trips + rest where its branches are uniform); None without a loop."""
    loops = [last - first + 1 for first, last in _loops(body)]
    if not loops:
        return None
    return min(loops), len(body) - min(loops)


def draw_loop_instructions(body: list) -> int | None:
    """Instructions a thread of one trip of the longest innermost loop: the SAP kernels' draw
    tile (in the merge, the tile loop holds no other loop; its searches of the draw chunks are
    shorter loops beside it); None without a loop."""
    loops = _loops(body)
    innermost = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1]
                                              for b in loops)]
    return max((last - first + 1 for first, last in innermost), default=None)


_TRITON_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_step_ops(cuda_sass: str, triton: list[Variant], found: list) -> list[str]:
    """The roofline's instructions a K-loop step (CUDA_TC_STEP_OPS, TRITON_CONV_*STEP_OPS) and a
    k-WTA select pass (TRITON_KWTA_COUNT_PASS: the loop, the rest, registers) against the SASS of the
    variants they model: a problem where one differs by more than STEP_OPS_TOLERANCE or its
    variant is missing."""
    from . import roofline

    tolerance = roofline.STEP_OPS_TOLERANCE
    problems = []

    def compare(what: str, model: int, counted: int | None) -> None:
        if counted is None:
            problems.append(f"{what}: no K-loop step found in the SASS")
        elif abs(model - counted) > tolerance * counted:
            problems.append(f"{what}: the roofline charges {model} lane instructions a step, "
                            f"the sm_{ARCH} SASS has {counted}: update the roofline")

    functions = sass_functions(cuda_sass)
    names = demangle(functions)
    cuda_types = {"float32": "float", "bfloat16": "c10::BFloat16", "float16": "c10::Half"}
    for dtype, model in roofline.CUDA_TC_STEP_OPS.items():
        kernel = f"masked_conv2d_tc_kernel<{cuda_types[dtype]}>"
        body = next((b for m, b in functions.items() if _short(names[m])[0] == kernel), None)
        # TF32's mma runs as an inner loop of two trips a step (16-bit types: one).
        compare(f"cuda {kernel}", model,
                None if body is None else step_instructions(body, 2 if dtype == "float32" else 1))
    # The packed kernels: a step a trip; patch tiles less their patch copies' branch (its
    # set-up and a trip of its loop: CUDA_PATCH_SETUP_OPS, CUDA_PATCH_TRIP_OPS, run once a
    # chunk).
    for (tile_rows, patch), by_dtype in roofline.CUDA_TC_PACKED_STEP_OPS.items():
        for dtype, model in by_dtype.items():
            kernel = (f"masked_conv2d_tc_packed_kernel<{cuda_types[dtype]}, {tile_rows}, "
                      f"{str(patch).lower()}>")
            body = next((b for m, b in functions.items() if _short(names[m])[0] == kernel), None)
            counted = None if body is None else step_instructions(body)
            branches = [] if body is None else branch_copy_loops(body) or []
            if patch and counted is not None:
                if len(branches) != 1:
                    problems.append(f"cuda {kernel}: {len(branches)} patch copy loops in the "
                                    f"K-loop step of the SASS, 1 expected")
                    continue
                (region, loop), = branches
                counted -= region
                compare(f"cuda {kernel} patch copies' set-up",
                        roofline.CUDA_PATCH_SETUP_OPS[tile_rows][dtype], region - loop)
                compare(f"cuda {kernel} patch copies' trip", roofline.CUDA_PATCH_TRIP_OPS, loop)
            compare(f"cuda {kernel}", model, counted)
    rows = {}
    for row, v in zip(triton, found):
        if v.kernel.__name__ == "_masked_conv2d_forward_kernel":
            c = v.constexprs
            precision = "tf32" if row.dtype == "fp32" else "ieee"
            if c["PRECISION"] == precision and not c.get("IN_SCALE"):
                rows[(bool(c["SPARSE"]), bool(c.get("IN_LIST")), bool(c.get("PACKED")),
                      c["BLOCK_P"], c["BLOCK_CO"], _TRITON_DTYPES.get(row.dtype))] = row
            # A GATED variant's dense body: the packed step of its dense tile, where the
            # roofline charges one.
            dense = roofline.TRITON_CONV_PACKED_STEP_OPS.get((c.get("DENSE_P"), c.get("DENSE_CO")))
            if c.get("GATED") and c["PRECISION"] == precision and dense:
                model = dense.get(_TRITON_DTYPES.get(row.dtype))
                if model is not None:
                    compare(f"triton _masked_conv2d_forward_kernel {row.dtype} BLOCK_P="
                            f"{c['BLOCK_P']} GATED dense DENSE_P={c['DENSE_P']} "
                            f"DENSE_CO={c['DENSE_CO']}", model, row.dense_step_ops)
    tables = [((sparse, listed, False, block_p, block_co), by_dtype)
              for (sparse, listed, block_p, block_co), by_dtype
              in roofline.TRITON_CONV_STEP_OPS.items()]
    tables += [((False, False, True, block_p, block_co), by_dtype)
               for (block_p, block_co), by_dtype in roofline.TRITON_CONV_PACKED_STEP_OPS.items()]
    tables += [((True, False, True, block_p, block_co), by_dtype)
               for (block_p, block_co), by_dtype
               in roofline.TRITON_CONV_SPARSE_PACKED_STEP_OPS.items()]
    for (sparse, listed, packed, block_p, block_co), by_dtype in tables:
        for dtype, model in by_dtype.items():
            row = rows.get((sparse, listed, packed, block_p, block_co, dtype))
            what = (f"triton _masked_conv2d_forward_kernel {dtype} BLOCK_P={block_p} "
                    f"BLOCK_CO={block_co}{' SPARSE' if sparse else ''}"
                    f"{' IN_LIST' if listed else ''}{' PACKED' if packed else ''}")
            if row is None:
                problems.append(f"{what}: no such variant in the AOT list")
            else:
                compare(what, model, row.step_ops)
    kwta = {(v.constexprs["BLOCK"], v.constexprs.get("EVEN")): row
            for row, v in zip(triton, found)
            if v.kernel.__name__ == "_kwta_forward_kernel" and row.dtype == "fp32"
            and v.constexprs.get("UNIT")}
    for (block, even), (loop, rest, regs) in roofline.TRITON_KWTA_COUNT_PASS.items():
        what = f"triton _kwta_forward_kernel float32 BLOCK={block} UNIT{' EVEN' if even else ''}"
        row = kwta.get((block, even))
        if row is None:
            problems.append(f"{what}: no such variant in the AOT list")
            continue
        counted = row.loop_ops or (None, None)
        compare(f"{what} (select pass)", loop, counted[0])
        compare(f"{what} (outside the pass loop)", rest, counted[1])
        if abs(regs - row.regs) > tolerance * row.regs:
            problems.append(f"{what}: the roofline assumes {regs} registers a thread, the "
                            f"sm_{ARCH} cubin has {row.regs}: update the roofline")
    sap = {(v.kernel.__name__, v.constexprs["E"],
            bool(v.constexprs.get("STORED", v.constexprs.get("STORE")))): (row, v)
           for row, v in zip(triton, found)
           if v.kernel.__name__ in ("_sap_merge_kernel", "_sap_partials_kernel")
           and row.dtype == "fp32"}
    for e, counts in roofline.TRITON_SAP_MERGE_OPS.items():
        for stored, kind in ((False, ""), (True, "stored_")):
            what = f"triton _sap_merge_kernel float32 E={e}{' STORED' if stored else ''}"
            row, _ = sap.get(("_sap_merge_kernel", e, stored), (None, None))
            if row is None:
                problems.append(f"{what}: no such variant in the AOT list")
                continue
            compare(f"{what} (a draw tile)", counts[kind + "tile"], row.draw_ops)
            regs = counts[kind + "regs"]
            if abs(regs - row.regs) > tolerance * row.regs:
                problems.append(f"{what}: the roofline assumes {regs} registers a thread, "
                                f"the sm_{ARCH} cubin has {row.regs}: update the roofline")
    if roofline.TRITON_SAP_PARTIALS_OPS:
        what = "triton _sap_partials_kernel float32 E=1024"
        row, _ = sap.get(("_sap_partials_kernel", 1024, False), (None, None))
        if row is None:
            problems.append(f"{what}: no such variant in the AOT list")
        else:
            compare(f"{what} (a draw tile)", roofline.TRITON_SAP_PARTIALS_OPS["tile"],
                    row.draw_ops)
    return problems


# -------------------------------------------------------------------------- Triton variants


def _triton_one(index: int) -> tuple:
    from pyprune.triton_kernels import aot

    variant = aot.variants()[0][index]
    compiled = aot.compile_variant(variant, ARCH)
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        (usage,) = parse_resource_usage(_run([tool, "--dump-resource-usage", path])).values()
        threads = next(iter(parse_block_sizes(_run([tool, "-elf", path])).values()), 0)
        (body,) = sass_functions(_run([tool, "-sass", path])).values()
    steps, dense_steps = step_instructions(body), None
    if variant.constexprs.get("GATED"):  # the block-sparse body's step and the dense one's
        steps, dense_steps = gated_step_instructions(body)
    return (index, usage, threads, compiled.metadata.shared, compiled.metadata.num_warps,
            dense_steps, steps, loop_instructions(body), pipeline_drains(body),
            draw_loop_instructions(body), memory_fences(body))


# Triton kernels whose programs hand results to later programs of the same launch, with the
# GPU-scope fences that takes (a release: the fence before the atomic that publishes them).
# sap's bernoulli kernel: a partials item's sum and max |x|, then its done count. sap's exact
# partials: a chunk's partial, then its sample's count (acq_rel: the last program reads every
# partial for the prefix rows). cas's stream kernel (up to 64 classes): a tile's channel sums,
# then its sample's count; the sample's tail, its bad-label mark, then the batch's count.
RELEASES = {"sap._sap_bernoulli_kernel": 1, "sap._sap_partials_kernel": 1,
            "cas._cas_stream_kernel": 2}


def memory_fences(body: list) -> int:
    """GPU- or system-scope MEMBAR instructions of a SASS body: each waits until every memory
    access of the thread in flight is visible beyond the SM. Triton emits one (and an L1
    invalidation) around every atomic of the default semantics, acq_rel. (MEMBAR.ALL.CTA, which
    its software pipelines put before an async-proxy fence, stays inside the SM: not counted.)"""
    return sum(1 for _, ins in body
               if re.search(r"(^|\s)MEMBAR\.\w+\.(GPU|SYS)\b", ins))


def _config(constexprs: dict, options: dict) -> str:
    return " ".join([f"{k}={v}" for k, v in constexprs.items()] +
                    [f"{k}={v}" for k, v in options.items()])


def triton_variants(jobs: int) -> tuple[list[Variant], list]:
    """The Triton variants (compiled for sm_90 in ``jobs`` processes), and the aot.Variant of
    each."""
    from pyprune.triton_kernels import aot

    found, missing = aot.variants()
    if missing:
        raise RuntimeError(f"Triton kernels without an AOT entry: {missing}")
    indices = [i for i, v in enumerate(found) if ARCH in v.archs]  # entries launched on sm_90
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_triton_one, indices))
    else:
        results = [_triton_one(i) for i in indices]
    variants = []
    for (index, (regs, stack, smem, local), threads, shared, num_warps, dense_steps, steps,
         loop, drains, draws, fences) in results:
        v = found[index]
        dtype = next((t[1:] for t in v.signature.values() if t.startswith("*")), "-")
        row = Variant("triton", f"{v.module}.{v.kernel.__name__}", dtype,
                      _config(v.constexprs, v.options), threads, regs, stack, local, smem, shared,
                      step_ops=steps, loop_ops=loop, draw_ops=draws,
                      dense_step_ops=dense_steps)
        if threads != 32 * num_warps:
            row.problems.append(f"ELF block size {threads} != 32 * num_warps ({num_warps})")
        if drains:
            row.problems.append("its pipelined loop waits for every copy in flight each trip "
                                "(DEPBAR.LE SB0, 0x0): the pipeline drains")
        if fences > RELEASES.get(row.kernel, 0):
            row.problems.append(f"{fences} GPU-scope MEMBAR in its SASS: an atomic with acq_rel "
                                "semantics (tl.atomic_*'s default) waits for every store in "
                                "flight; pass sem='relaxed' where a launch boundary orders the "
                                "results")
        variants.append(row)
    return variants, [found[i] for i in indices]


# ------------------------------------------------------------------- which cases use a variant


def triton_launches() -> dict[tuple, list[str]]:
    """{(kernel name, dtype, constexprs and launch options): ["<op> <case> fwd|bwd", ...]}: every
    Triton launch of the benchmarks' pyprune-triton provider, recorded by running each case on
    CPU tensors with the launches replaced by a recorder (so the launchers' own code picks the
    configs; nothing is computed, and integer tensors are zeroed to keep the host code that
    reads them in range)."""
    import torch
    from triton.runtime.jit import JITFunction

    from pyprune import _backend

    from . import harness

    dtypes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    recorded: list[tuple] = []

    def record(self, *args, grid, warmup, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        recorded.append((self.fn.__name__, dtypes.get(tensors[0].dtype, str(tensors[0].dtype)),
                         tuple(sorted(kwargs.items()))))
        # Integer outputs as a run would leave them valid: indices and counters 0, and CAS's
        # label flag (set by the stream kernel, asserted by its launcher) 1.
        ints = {name: t for name, t in zip(self.arg_names, args)
                if isinstance(t, torch.Tensor) and not t.is_floating_point()}
        for name, t in ints.items():
            if name != "flag_ptr":
                t.fill_(0)
        if "flag_ptr" in ints:
            ints["flag_ptr"].fill_(1)

    def run(step) -> set[tuple]:
        recorded.clear()
        step()
        return set(recorded)

    launches: dict[tuple, list[str]] = collections.defaultdict(list)
    saved = JITFunction.run, _backend._TRITON_INTERPRET
    JITFunction.run, _backend._TRITON_INTERPRET = record, True
    try:
        for op, module in harness.discover_ops().items():
            setup = harness.setup_of(op, module)
            for case in module.CASES:
                provider, cpu = harness.PYPRUNE + "triton", torch.device("cpu")
                fwd = run(lambda: setup(case, provider, "forward", cpu).fn())
                recorded.clear()
                step = setup(case, provider, "backward", cpu)  # runs the forward with grad
                fwd |= set(recorded)
                bwd = run(step.fn)
                for key in fwd | bwd:
                    mode = "+".join(m for m, keys in (("fwd", fwd), ("bwd", bwd)) if key in keys)
                    launches[key].append(f"{op} {case.label} {mode}")
    finally:
        JITFunction.run, _backend._TRITON_INTERPRET = saved
    return launches


def _launch_key(v) -> tuple:
    """The triton_launches key of an aot.Variant."""
    dtype = next((t[1:] for t in v.signature.values() if t.startswith("*")), "-")
    return (v.kernel.__name__, dtype, tuple(sorted({**v.constexprs, **v.options}.items())))


def _benchmark_cases() -> dict[str, list]:
    from . import harness

    return {op: list(module.CASES) for op, module in harness.discover_ops().items()}


def _kwta_group(case) -> int:
    return math.prod(case.shape[2 if case.variant == "channel" else 1:])


def _sap_block_chunks(case) -> int:
    """Chunks a block of sap.cu's one-launch bernoulli kernel for a bernoulli case on an H100 /
    H200 (0: not that kernel)."""
    from benchmarks import roofline

    if case.variant != "bernoulli":
        return 0
    return roofline.cuda_sap_one_launch(case.shape[0], math.prod(case.shape[1:]),
                                        roofline.GPUS["h200"]["sms"])[0]


def _conv_packed(case) -> tuple[int, bool] | None:
    """(tile rows, patch tiles) of the packed kernel a masked_conv benchmark case's CUDA forward
    runs (roofline's mirror of masked_conv.cu's choice), None where it runs none."""
    from . import roofline

    kernels = [i.name for i in roofline.plan("masked_conv", case, roofline.CUDA, "forward",
                                             "h200").items if isinstance(i, roofline.Kernel)]
    if not any(name.startswith("masked_conv2d_tc_packed_kernel") for name in kernels):
        return None
    g = roofline._conv_shape(case)
    t = roofline._cuda_packed_tiling(g, g.kind != "sample-out")
    return t.rows, t.patch


def _cas_rows4(case) -> bool:
    return case.shape[2] * case.shape[3] % 4 == 0


def _cas_classes(case) -> int:
    """The classes of a CAS benchmark case (benchmarks/cas.py: "c<classes>" variants, else 10)."""
    from benchmarks import cas as cas_bench

    return cas_bench.classes_of(case)


def _kwta_warp_max() -> int:
    return int(re.search(r"kWarpMaxGroup\s*=\s*(\d+)", (ROOT / "csrc/cuda/kwta.cu").read_text())[1])


# Which float32 benchmark cases launch a CUDA kernel on the cuda backend (the auto path on CUDA
# tensors): {regular expression on the kernel: (op, uses(case), mode)}, by the rules of the host
# code in csrc/cuda. A rule that matches no kernel of the library is reported (stale).
CUDA_USES = {
    # cas.cu: every CAS benchmark case trains (kTrain = 0 streams, the logits with a label;
    # backward kBwd = 3); NCHW rows go 4 floats at a time where L = H * W is a multiple of 4.
    r"^cas_rows_kernel<float, 4, 0, true>": ("cas", lambda c: _cas_rows4(c), "fwd"),
    r"^cas_rows_kernel<float, 4, 0, false>": ("cas", lambda c: not _cas_rows4(c), "fwd"),
    r"^cas_logits_kernel<float, true, 1>": ("cas", lambda c: True, "fwd"),
    r"^cas_rows_kernel<float, 4, 3, true>": ("cas", lambda c: _cas_rows4(c), "bwd"),
    r"^cas_rows_kernel<float, 4, 3, false>": ("cas", lambda c: not _cas_rows4(c), "bwd"),
    r"^cas_gather_rows_kernel<float>": ("cas", lambda c: _cas_classes(c) <= 64, "bwd"),
    r"^cas_weight_grad_kernel<float>": ("cas", lambda c: _cas_classes(c) > 64, "bwd"),
    # kwta.cu kwta_cuda_impl: a warp per group up to kWarpMaxGroup, else a block of 256 threads
    # up to 8192 elements, else 512; contiguous float32 rows are vectorized.
    # The warp kernel's template arguments: lanes a group (32 for 513 to 1024 elements), and
    # unit-stride rows (the benchmarks' contiguous x).
    r"^kwta_warp_kernel<float, 32, true>": (
        "kwta", lambda c: _kwta_warp_max() // 2 < _kwta_group(c) <= _kwta_warp_max(), "fwd"),
    r"^kwta_block_kernel<float, 256, true>": (
        "kwta", lambda c: _kwta_warp_max() < _kwta_group(c) <= 8192, "fwd"),
    r"^kwta_block_kernel<float, 512, true>": ("kwta", lambda c: _kwta_group(c) > 8192, "fwd"),
    r"^kwta_backward_kernel<float, u32, true>": ("kwta", lambda c: True, "bwd"),
    # masked_conv.cu: with cudnn.allow_tf32 (PyTorch's default, kept by the benchmarks) float32
    # takes the tensor-core kernels; masked_conv2d_kernel<float> runs with TF32 off only.
    # Per-sample masks without a bool in_mask (the forward of the sample-out cases), and static
    # masks whose reduction is short (static_on_tensor_cores: every static case of the
    # benchmarks), pack x and the weight first and run the packed kernel: the tiles of
    # roofline._cuda_packed_tiling (patch tiles of 32 rows x 64 pixels for all of the benchmarks'
    # maps). The sample-out cases' backward grad_x has the out_mask as its in_mask and runs the
    # gathering kernel.
    r"^pack_kernel<float>": ("masked_conv", lambda c: _conv_packed(c) is not None, "fwd"),
    r"^masked_conv2d_tc_packed_kernel<float, 32, false>": (
        "masked_conv", lambda c: _conv_packed(c) == (32, False), "fwd"),
    r"^masked_conv2d_tc_packed_kernel<float, 64, false>": (
        "masked_conv", lambda c: _conv_packed(c) == (64, False), "fwd"),
    r"^masked_conv2d_tc_packed_kernel<float, 32, true>": (
        "masked_conv", lambda c: _conv_packed(c) == (32, True), "fwd"),
    r"^masked_conv2d_tc_packed_kernel<float, 64, true>": (
        "masked_conv", lambda c: _conv_packed(c) == (64, True), "fwd"),
    r"^masked_conv2d_tc_kernel<float>": ("masked_conv",
                                         lambda c: c.variant.startswith("sample"), "bwd"),
    # Static output masks past the packed kernel's limit: cuDNN on the kept channels, then this
    # write of the whole output (none of the benchmarks' cases).
    r"^scatter_kept_channels_kernel<float, false>": (
        "masked_conv", lambda c: c.variant.startswith("out") and _conv_packed(c) is None, "fwd"),
    # noise.cu: contiguous, aligned x and out take the vector kernel.
    r"^noise_kernel<float, true>": ("noise", lambda c: True, "fwd"),
    # sap.cu: exact mode's partials, prefix and merge; bernoulli mode's one launch (a cluster a
    # sample, G chunks a block: every benchmark row has L % 4 == 0 and at most 64 chunks; the
    # two-launch elementwise pass serves the others); forward and backward run the same
    # launches.
    r"^sap_partials_kernel<float>": ("sap", lambda c: c.variant == "exact", "fwd+bwd"),
    r"^sap_prefix_kernel<float>": ("sap", lambda c: c.variant == "exact", "fwd+bwd"),
    r"^sap_merge_kernel<float>": ("sap", lambda c: c.variant == "exact", "fwd+bwd"),
    **{rf"^sap_bernoulli_cluster_kernel<float, {g}>": (
        "sap", lambda c, g=g: _sap_block_chunks(c) == g, "fwd+bwd") for g in (1, 2, 4)},
}


def cuda_uses(kernel: str, cases: dict[str, list]) -> list[str]:
    """["<op> <case> <mode>", ...] of a CUDA kernel (CUDA_USES)."""
    for pattern, (op, uses, mode) in CUDA_USES.items():
        if re.search(pattern, kernel):
            return [f"{op} {c.label} {mode}" for c in cases.get(op, []) if uses(c)]
    return []


def _summarize(uses: list[str]) -> str:
    """'op case, case (mode); ...' with the cases of one op and mode grouped."""
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for use in uses:
        op, rest = use.split(" ", 1)
        label, mode = rest.rsplit(" ", 1)
        groups[(op, mode)].append(label)
    return "; ".join(f"{op} {', '.join(labels)} ({mode})" for (op, mode), labels in groups.items())


# ------------------------------------------------------------------------------------ report

COLUMNS = ("kind", "kernel", "dtype", "config", "threads", "regs", "stack_bytes", "local_bytes",
           "static_smem", "dynamic_smem", "smem_per_block", "blocks_per_sm", "warps_per_sm",
           "occupancy_pct", "limiter", "used_by", "why_fine", "problems")


def judge(variants: list[Variant]) -> None:
    for v in variants:
        v.occ = occupancy(v.regs, v.threads, v.static_smem + v.dynamic_smem) if v.threads else None
        if v.stack:
            v.problems.append(f"{v.stack} B stack frame (spills or local arrays)")
        if v.local:
            v.problems.append(f"{v.local} B local memory")
        if v.occ is not None and v.occ.fraction < MIN_OCCUPANCY:
            v.why_fine = next((why for pattern, why in JUSTIFIED.items()
                               if re.search(pattern, v.key)), "")
            if not v.why_fine:
                v.problems.append(f"occupancy {100 * v.occ.fraction:.1f}% < "
                                  f"{100 * MIN_OCCUPANCY:.0f}%")


def _cells(v: Variant) -> tuple:
    o = v.occ
    return (v.kind, v.kernel, v.dtype, v.config, v.threads, v.regs, v.stack, v.local,
            v.static_smem, v.dynamic_smem, o.smem_per_block if o else "", o.blocks if o else "",
            o.warps if o else "", f"{100 * o.fraction:.1f}" if o else "", o.limiter if o else "",
            _summarize(v.used_by), v.why_fine, "; ".join(v.problems))


def write_csv(path: Path, variants: list[Variant]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(_cells(v) for v in variants)


def markdown(variants: list[Variant], extra_problems: list[str], notes: list[str]) -> str:
    bad = [v for v in variants if v.problems]
    low = [v for v in variants if v.occ and v.occ.fraction < MIN_OCCUPANCY]
    kinds = collections.Counter(v.kind for v in variants)
    lines = [
        f"# {SM90.name} resources of every pyprune kernel variant",
        "",
        "Generated by `make gpu-report` (`python -m benchmarks.gpu_report`); do not edit by hand.",
        f"CUDA: every kernel instantiation in the `make check-cuda` library ({kinds['cuda']}); "
        f"Triton: every variant of the kernel modules' `AOT` lists ({kinds['triton']}), compiled "
        f"for sm_{ARCH}.",
        "",
        "Occupancy is theoretical (cuda_occupancy.h's model): 65536 registers per SM in 4 "
        "sub-partitions, allocated per warp in units of 256; 2048 threads, 64 warps and 32 "
        "blocks per SM; 228 KB of shared memory per SM, each block's static + dynamic shared "
        "memory plus the driver's 1 KB reservation rounded up to 128 B (static shared memory is "
        "the ELF's, which on sm_90 includes a 1 KB window where ptxas places one). Threads per "
        "block are the kernels' launch bounds (`__launch_bounds__`, Triton's `.reqntid`), which "
        "are their block sizes. `stack` is the stack frame (spills and local arrays).",
        "",
        "`used by`: the benchmark cases (float32; fwd / bwd) whose launches use the variant: for "
        "CUDA kernels the cuda backend (the auto path on CUDA tensors for every op but "
        "masked_conv2d: pyprune._backend.AUTO), by the host code's rules; for Triton variants "
        "the triton backend, recorded from the launchers themselves.",
        "",
        f"Summary: {len(variants)} variants, {sum(1 for v in variants if v.stack or v.local)} "
        f"with a stack frame or local memory, {len(low)} below {100 * MIN_OCCUPANCY:.0f}% "
        f"occupancy ({sum(1 for v in low if v.why_fine)} justified), {len(bad)} failing.",
    ]
    if extra_problems:
        lines += ["", "Other problems:", ""] + [f"- {p}" for p in extra_problems]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if low:
        lines += ["", f"Below {100 * MIN_OCCUPANCY:.0f}% occupancy:", ""]
        lines += [f"- {v.kind} `{v.kernel}` {' '.join(filter(None, (v.dtype, v.config)))}: "
                  f"{100 * v.occ.fraction:.1f}%: {v.why_fine or '**not justified**'}" for v in low]
    header = ("kind", "kernel", "dtype", "config", "threads", "regs", "stack B", "local B",
              "static smem", "dyn smem", "blocks/SM", "occupancy", "limiter", "used by",
              "why fine / problems")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        o = v.occ
        note = "; ".join(v.problems) or v.why_fine
        cells = (v.kind, f"`{v.kernel}`", v.dtype, v.config, v.threads, v.regs, v.stack, v.local,
                 v.static_smem, v.dynamic_smem, o.blocks if o else "-",
                 f"{100 * o.fraction:.1f}%" if o else "-", o.limiter if o else "-",
                 _summarize(v.used_by) or "-", ("**FAIL** " if v.problems else "") + note)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lib", type=Path, help=f"the CUDA build (default: {DEFAULT_LIB_GLOB})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for sm_90-resources.md and .csv")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel Triton compiles (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the Triton kernels are compiled, not interpreted")

    lib = args.lib
    if lib is None:
        libs = sorted(glob.glob(str(ROOT / DEFAULT_LIB_GLOB)))
        if len(libs) != 1:
            print(f"gpu-report: expected one {DEFAULT_LIB_GLOB}, found {len(libs)}: run make "
                  f"check-cuda", file=sys.stderr)
            return 1
        lib = Path(libs[0])

    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    problems = check_launch_bounds(sources)
    cuda = cuda_variants(lib)
    for arch in SPILL_ARCHS:
        problems += cuda_spills(lib, arch)
    triton, found = triton_variants(args.jobs)
    problems += check_step_ops(_run([cuobjdump(), "-sass", "-arch", f"sm_{ARCH}", str(lib)]),
                               triton, found)

    cases = _benchmark_cases()
    for v in cuda:
        v.used_by = cuda_uses(v.kernel, cases)
    notes = [f"the used-by rule {pattern!r} (CUDA_USES) matches no kernel: update it"
             for pattern in CUDA_USES if not any(re.search(pattern, v.kernel) for v in cuda)]
    dynamic = dynamic_smem_kernels(sources)
    unknown = sorted({v.kernel.split("<")[0] for v in cuda if v.kernel.split("<")[0] in dynamic
                      and not any(re.search(p, v.kernel) for p in DYNAMIC_SMEM)})
    notes += [f"`{k}` is launched with dynamic shared memory that DYNAMIC_SMEM does not give: "
              f"its occupancy counts none" for k in unknown]
    launches = triton_launches()
    keys = {_launch_key(a): row for a, row in zip(found, triton)}
    for key, uses in launches.items():
        if key in keys:
            keys[key].used_by = uses
        else:
            problems.append(f"a benchmark launches Triton {key[0]} {key[1]} {dict(key[2])}, "
                            f"which no AOT list holds: {', '.join(uses)}")

    variants = cuda + triton
    judge(variants)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"sm_{ARCH}-resources.csv", variants)
    (args.out / f"sm_{ARCH}-resources.md").write_text(markdown(variants, problems, notes))

    failing = [v for v in variants if v.problems]
    for v in failing:
        print(f"FAIL  {v.key}: {'; '.join(v.problems)}", file=sys.stderr)
    for p in problems:
        print(f"FAIL  {p}", file=sys.stderr)
    for note in notes:
        print(f"NOTE  {note}", file=sys.stderr)
    low = [v for v in variants if v.occ and v.occ.fraction < MIN_OCCUPANCY]
    print(f"gpu-report: {len(variants)} variants ({len(cuda)} CUDA, {len(triton)} Triton) for "
          f"sm_{ARCH}; {sum(1 for v in variants if v.stack or v.local)} with stack or local "
          f"memory, {len(low)} below {100 * MIN_OCCUPANCY:.0f}% occupancy "
          f"({sum(1 for v in low if v.why_fine)} justified); {len(failing) + len(problems)} "
          f"problem(s); wrote {args.out / f'sm_{ARCH}-resources.md'} and .csv")
    return 1 if failing or problems else 0


if __name__ == "__main__":
    sys.exit(main())
