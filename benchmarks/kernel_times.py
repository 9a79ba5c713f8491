"""``python -m benchmarks.kernel_times [--op OP ...] [--mode MODE ...] [--runs N] [--out DIR]``

Where the time of a benchmark call goes on a GPU: each case of the goal modes (forward; CAS
forward + backward) is run ``--runs`` times per provider under ``torch.profiler`` (CUPTI), and
every GPU activity (kernel, memcpy, memset) is summed by name. Written to
``<out>/<gpu>/kernel_times.csv``:

    op, shape, mode, provider, kernel, launches_per_call, device_us_per_call, span_us_per_call

one row per kernel name, and a row ``kernel = (all)`` per provider whose ``device_us_per_call``
is the GPU's busy time a call and ``span_us_per_call`` the time from the first activity's start
to the last one's end over the runs, a call's share: where the span is much longer than the busy
time, the GPU waited for the host (launch and dispatch time), which the benchmark's
CUDA-event times include and the roofline model does not count; where the busy time itself is
far over the model's prediction, a kernel is slower than modelled and the per-kernel rows name
it. ``make gpu`` runs this after the benchmarks, in the time left.
"""
from __future__ import annotations

import argparse
import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from . import harness

COLUMNS = ("op", "shape", "mode", "provider", "kernel", "launches_per_call",
           "device_us_per_call", "span_us_per_call")
ALL = "(all)"
# The modes SPEC's GPU goals are stated in, per op.
GOAL_MODES = {"cas": ("full",)}
DEFAULT_MODES = ("forward",)


@dataclass(frozen=True)
class KernelTime:
    kernel: str
    launches_per_call: float
    device_us_per_call: float
    span_us_per_call: float


def _is_gpu(event: Any) -> bool:
    kind = getattr(event, "device_type", None)
    return kind is not None and kind != torch.autograd.DeviceType.CPU


def aggregate(events: Iterable[Any], runs: int) -> list[KernelTime]:
    """Per-call launches and GPU time of each GPU activity name among ``events`` (profiler
    FunctionEvents: ``name``, ``device_type``, ``time_range`` in microseconds), busiest first,
    after one ``(all)`` row with the busy time and the span of all of them."""
    launches: dict[str, int] = collections.Counter()
    busy: dict[str, float] = collections.defaultdict(float)
    start, end = float("inf"), float("-inf")
    for e in events:
        if not _is_gpu(e):
            continue
        launches[e.name] += 1
        busy[e.name] += e.time_range.end - e.time_range.start
        start = min(start, e.time_range.start)
        end = max(end, e.time_range.end)
    if not launches:
        return []
    span = (end - start) / runs
    rows = [KernelTime(ALL, sum(launches.values()) / runs, sum(busy.values()) / runs, span)]
    for name in sorted(busy, key=busy.get, reverse=True):
        rows.append(KernelTime(name, launches[name] / runs, busy[name] / runs, span))
    return rows


def profile_step(step: harness.Step, device: torch.device, runs: int) -> list[KernelTime]:
    """``step`` warmed up, then ``runs`` calls under the profiler, GPU activities aggregated."""
    run = harness.synchronized(step.fn, device)
    for _ in range(3):
        run()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(runs):
            step.fn()
        torch.cuda.synchronize(device)
    return aggregate(prof.events(), runs)


def main(argv: list[str] | None = None) -> int:
    ops = harness.discover_ops()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_times",
                                     description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--op", action="append", choices=sorted(ops), help="default: all")
    parser.add_argument("--mode", action="append", choices=harness.MODES,
                        help="default: the goals' modes (forward; CAS forward + backward)")
    parser.add_argument("--runs", type=int, default=20, help="profiled calls a provider (20)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS,
                        help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the profile is of GPU activities")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    device = torch.device("cuda")
    path = args.out / harness.device_dir(device) / "kernel_times.csv"
    rows: list[tuple] = []
    started = time.perf_counter()
    for op in args.op or ["kwta", "sap", "noise", "cas", "masked_conv"]:
        setup = harness.setup_of(op, ops[op])
        for case in ops[op].CASES:
            torch._dynamo.reset()
            for mode in args.mode or GOAL_MODES.get(op, DEFAULT_MODES):
                for provider in harness.providers("cuda"):
                    if provider == harness.COMPILE:
                        continue
                    times = profile_step(setup(case, provider, mode, device), device, args.runs)
                    rows += [(op, case.label, mode, provider, t.kernel, t.launches_per_call,
                              t.device_us_per_call, t.span_us_per_call) for t in times]
                    total = times[0] if times else None
                    if total is not None:
                        print(f"{op:<12} {case.label:<26} {mode:<8} {provider:<15} "
                              f"{total.launches_per_call:5.1f} launches, GPU busy "
                              f"{total.device_us_per_call:8.1f} us of {total.span_us_per_call:8.1f} "
                              f"us a call", flush=True)
            # After every case: a run stopped by its limit keeps what it has.
            harness.write_table(path, COLUMNS, rows)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
