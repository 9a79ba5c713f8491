"""``python -m benchmarks.ncu_targets [--list | --summarize CSV]``

The kernels whose GPU busy time is furthest over the roofline model (``kernel_times.csv``
beside ``python -m benchmarks.roofline --compare``), each called once from its benchmark case
for Nsight Compute: the selects of k-WTA (CUDA block kernel, Triton split path), SAP exact's
merge, SAP bernoulli's one launch (CUDA cluster kernel, Triton ticket-ordered items), CAS's
backward gather, CAS's Triton forward stream (its logits tail in each sample's last
program, 64 registers: 50% occupancy, where the stream had 62.5%) and the masked convolutions
(Triton; CUDA's packed per-sample kernel, new and not measured yet). ``make gpu`` runs

    ncu --profile-from-start off --kernel-name-base function -k regex:<KERNELS> \\
        --section SpeedOfLight --section LaunchStats --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        --csv --page details python -m benchmarks.ncu_targets

plus the stall-reason metrics of STALLS (``--ncu-args`` prints that argument list), so that
each target's one profiled call (between cudaProfilerStart and cudaProfilerStop, after three
warm-up calls) gives the metrics of its kernel, and then ``--summarize`` on ncu's CSV
prints, per target in launch order: duration, DRAM and SM throughput (% of peak), achieved
occupancy, registers, grid, L1 and L2 hit rates, and the three largest warp stall reasons,
with the raw CSV kept beside the results (``ncu.csv``).
"""
from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import harness


@dataclass(frozen=True)
class Target:
    op: str
    case: str  # the benchmark case's label
    mode: str
    provider: str
    kernel: str  # the kernel's function name, as ncu's --kernel-name-base function gives it

    @property
    def label(self) -> str:
        return f"{self.op} {self.case} {self.mode} {self.provider}"


TARGETS = (
    Target("kwta", "128x64x32x32", "forward", "pyprune-cuda", "kwta_block_kernel"),
    Target("kwta", "32x256x56x56", "forward", "pyprune-cuda", "kwta_block_kernel"),
    Target("kwta", "32x2048x7x7", "forward", "pyprune-cuda", "kwta_block_kernel"),
    Target("kwta", "128x64x32x32", "forward", "pyprune-triton", "_kwta_filter_kernel"),
    Target("sap", "128x64x32x32 exact", "forward", "pyprune-cuda", "sap_merge_kernel"),
    Target("sap", "128x64x32x32 exact", "forward", "pyprune-triton", "_sap_merge_kernel"),
    Target("sap", "128x64x32x32 bernoulli", "forward", "pyprune-cuda",
           "sap_bernoulli_cluster_kernel"),
    # one launch of partials and elementwise items: whether the HBM reads overlap the issue-bound
    # items (DRAM and SM throughput together), x's second read hits L2, and items wait
    Target("sap", "128x64x32x32 bernoulli", "forward", "pyprune-triton", "_sap_bernoulli_kernel"),
    Target("cas", "32x2048x7x7 c1000", "full", "pyprune-cuda", "cas_gather_rows_kernel"),
    Target("cas", "128x64x32x32", "full", "pyprune-triton", "_cas_stream_kernel"),
    # the packed kernel: a chunk's taps back to back, x's patch from L1 after the first tap
    Target("masked_conv", "32x256x8x8 out50", "forward", "pyprune-triton",
           "_masked_conv2d_forward_kernel"),
    Target("masked_conv", "32x256x14x14 out50", "forward", "pyprune-triton",
           "_masked_conv2d_forward_kernel"),
    Target("masked_conv", "32x128x16x16 sample-out25", "forward", "pyprune-cuda",
           "masked_conv2d_tc_packed_kernel"),
    # patch tiles across samples, the K split over clusters
    Target("masked_conv", "32x512x4x4 out50", "forward", "pyprune-cuda",
           "masked_conv2d_tc_packed_kernel"),
)
# The metrics --summarize prints, by ncu's metric names (details page).
METRICS = {
    "Duration": "us",
    "DRAM Throughput": "dram %",
    "Compute (SM) Throughput": "sm %",
    "Achieved Occupancy": "occupancy %",
    "Registers Per Thread": "regs",
    "Grid Size": "grid",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    # The packed Triton convolution's taps after a chunk's first are modelled as L1 hits (its
    # 8-byte cp.async.ca copies of x): these check that, and the L2 traffic the model counts.
    "L1/TEX Hit Rate": "l1 hit %",
    "L2 Hit Rate": "l2 hit %",
}
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats",
            "MemoryWorkloadAnalysis")
# Warp stall reasons: the cycles a warp spends stalled on each, per issued instruction.
STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "membar", "wait", "lg_throttle",
          "mio_throttle", "math_pipe_throttle", "not_selected", "dispatch_stall", "drain",
          "branch_resolving", "no_instruction", "tex_throttle", "sleeping")
_STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
_STALL_RE = re.compile(re.escape(_STALL_METRIC).replace(re.escape("{}"), r"(\w+)"))
_TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def kernel_regex() -> str:
    """ncu's -k filter: the targets' kernels (unanchored: a template's function name may carry
    its arguments)."""
    return "regex:(" + "|".join(sorted({re.escape(t.kernel) for t in TARGETS})) + ")"


def ncu_args() -> list[str]:
    """ncu's arguments before the profiled command."""
    args = ["--profile-from-start", "off", "--kernel-name-base", "function", "-k", kernel_regex()]
    for section in SECTIONS:
        args += ["--section", section]
    args += ["--metrics", ",".join(_STALL_METRIC.format(s) for s in STALLS)]
    return args + ["--csv", "--page", "details"]


def resolve(ops: dict) -> list[tuple[Target, harness.Case]]:
    """Each target with its benchmark case; raises if a target names no case or provider."""
    out = []
    for t in TARGETS:
        cases = {c.label: c for c in ops[t.op].CASES}
        if t.case not in cases:
            raise ValueError(f"{t.label}: no case {t.case!r} in benchmarks/{t.op}.py")
        if t.mode not in harness.MODES or t.provider not in (harness.PYPRUNE + "cuda",
                                                             harness.PYPRUNE + "triton"):
            raise ValueError(f"{t.label}: unknown mode or provider")
        out.append((t, cases[t.case]))
    return out


def run(device: torch.device) -> None:
    """Each target's case: three calls outside the profiled range, one inside it."""
    ops = harness.discover_ops()
    cudart = torch.cuda.cudart()
    for i, (t, case) in enumerate(resolve(ops)):
        step = harness.setup_of(t.op, ops[t.op])(case, t.provider, t.mode, device)
        call = harness.synchronized(step.fn, device)
        for _ in range(3):
            call()
        print(f"ncu target {i}: {t.label} ({t.kernel})", flush=True)
        cudart.cudaProfilerStart()
        call()
        cudart.cudaProfilerStop()


def summarize(path: Path) -> list[dict[str, str]]:
    """ncu's details CSV, one dict per profiled kernel in launch order: the target it belongs to
    (by order: each target's call launches its kernel once), METRICS and the top stall reasons."""
    text = path.read_text()
    start = text.find('"ID"')  # ncu prints its own log lines before the CSV
    if start < 0:
        raise ValueError(f"{path}: no ncu CSV (is ncu's output there?)")
    kernels: dict[str, dict[str, str]] = collections.OrderedDict()
    stalls: dict[str, dict[str, float]] = collections.defaultdict(dict)
    # Only the CSV's lines: ncu's own log lines (==PROF==, ==WARNING==) may come between them.
    lines = [ln for ln in text[start:].splitlines() if ln.startswith('"')]
    for row in csv.DictReader(lines):
        k = kernels.setdefault(row["ID"], {"kernel": row["Kernel Name"]})
        name, value = row["Metric Name"], row["Metric Value"].replace(",", "")
        if name == "Duration" and row.get("Metric Unit") in _TO_US:
            value = f"{float(value) * _TO_US[row['Metric Unit']]:.1f}"
        if name in METRICS:
            k[METRICS[name]] = value
        stall = _STALL_RE.fullmatch(name)
        if stall:
            try:
                stalls[row["ID"]][stall.group(1)] = float(value)
            except ValueError:
                pass
    out = []
    for i, (kid, k) in enumerate(kernels.items()):
        target = TARGETS[i] if i < len(TARGETS) else None
        k["target"] = target.label if target else "?"
        if target is not None and target.kernel not in k["kernel"]:
            k["target"] += f" (expected {target.kernel})"
        top = sorted(stalls[kid].items(), key=lambda kv: -kv[1])[:3]
        k["stalls"] = ", ".join(f"{n} {v:.1f}" for n, v in top)
        out.append(k)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ncu_targets",
                                     description="Run the Nsight Compute targets once each, or "
                                                 "summarize ncu's CSV of them.")
    parser.add_argument("--list", action="store_true", help="print the targets and ncu's -k")
    parser.add_argument("--ncu-args", action="store_true",
                        help="print ncu's arguments (one a line) for make gpu")
    parser.add_argument("--summarize", type=Path, metavar="CSV",
                        help="ncu --csv --page details output of a run under ncu")
    args = parser.parse_args(argv)
    if args.list:
        resolve(harness.discover_ops())
        for t in TARGETS:
            print(f"{t.label}: {t.kernel}")
        print(kernel_regex())
        return 0
    if args.ncu_args:
        print("\n".join(ncu_args()))
        return 0
    if args.summarize is not None:
        rows = summarize(args.summarize)
        for r in rows:
            print(f"{r['target']:<48} {r.get('us', '?'):>8} us  dram {r.get('dram %', '?'):>5}%  "
                  f"sm {r.get('sm %', '?'):>5}%  occupancy {r.get('occupancy %', '?'):>5}%  "
                  f"regs {r.get('regs', '?'):>4}  grid {r.get('grid', '?'):>7}  "
                  f"l1 hit {r.get('l1 hit %', '?'):>5}%  l2 hit {r.get('l2 hit %', '?'):>5}%  "
                  f"| {r['stalls']}")
        return 0 if rows else 1
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (run it under ncu on the GPU machine)")
    run(torch.device("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
