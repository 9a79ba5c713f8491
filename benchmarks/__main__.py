"""``python -m benchmarks [--op OP ...] [--device cpu|cuda] [--quick] [--out DIR] [--resume]
[--warm-only]``

Measures every case x provider x mode of each op, prints one table per case, and writes
``<out>/<device>/<op>.csv`` with ``<op>.png`` plus ``copy.csv`` (the copy-bandwidth baseline).
``--quick`` runs only the quick cases with a shorter time budget and, unless ``--out`` is given,
writes under the system's temporary directory, so it never overwrites stored results.
Each case's rows replace that case's stored rows as soon as it is measured; the cases a run does
not reach keep their stored rows (same device; the version and date columns say which run).
``--resume`` keeps the cases an op's CSV already holds in full (same device and pyprune version,
every provider and mode) and measures the others: a run stopped by a time limit goes on where it
stopped.
``--warm-only`` times nothing and writes nothing: it runs every provider of every case and mode
once, so that torch.compile's and Triton's on-disk caches hold their kernels before a timed run
(``make gpu`` runs it beside the tests).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from . import harness
from .harness import Row


def main() -> None:
    ops = harness.discover_ops()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time pyprune ops against eager PyTorch and torch.compile.",
    )
    parser.add_argument("--op", action="append", choices=sorted(ops),
                        help="op to run (repeatable; default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--quick", action="store_true", help="quick cases, short time budget")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results; "
                        "with --quick, pyprune-benchmarks in the temporary folder)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases an op's CSV already holds in full, measure the rest")
    parser.add_argument("--warm-only", action="store_true",
                        help="run every provider once (fills the compile caches); time nothing")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.warm_only:
        warm(ops, args.op or sorted(ops), torch.device(args.device), args.quick)
        return
    out = args.out or (Path(tempfile.gettempdir()) / "pyprune-benchmarks" if args.quick
                       else harness.RESULTS)

    started = time.perf_counter()
    info = harness.RunInfo.create(torch.device(args.device), args.quick)
    folder = out / info.results_name
    print(f"{info.device_name}, torch {info.torch}, pyprune {info.version}, "
          f"providers: {', '.join(harness.providers(args.device))}")
    # Other work on the host skews timings (on a 2-core CPU, by whole scheduler ticks).
    print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    copy = harness.copy_bandwidth(info)
    harness.store_copy_bandwidth(folder / "copy.csv", copy)
    print(f"copy bandwidth (read + write): {copy.gbps:.1f} GB/s")

    for op in args.op or sorted(ops):
        cases = [c for c in ops[op].CASES if c.quick or not args.quick]
        progress = harness.Progress(
            len(cases) * len(harness.MODES) * len(harness.providers(args.device))
        )
        csv_path = folder / f"{op}.csv"
        labels = [c.label for c in cases]
        # The CSV keeps the stored rows of the cases this run has not (yet) measured: a run
        # stopped by a time limit replaces only what it measured.
        stored = harness.stored_cases(csv_path, info, labels)
        measured: dict[str, list[Row]] = {}
        if args.resume:
            _, done = harness.complete_cases(csv_path, info, labels)
            if done:
                print(f"{op}: resuming, {len(done)} of {len(cases)} cases kept from {csv_path}")
            measured = {label: stored[label] for label in done}
            cases = [c for c in cases if c.label not in done]
            progress.advance(len(done) * len(harness.MODES) * len(harness.providers(args.device)))
        for case in cases:
            case_rows = harness.run_case(info, op, harness.setup_of(op, ops[op]), case, progress)
            progress.write(format_case(op, case, case_rows, copy.gbps))
            measured[case.label] = case_rows
            # After every case, so that a run stopped by a time limit keeps what it measured.
            harness.write_csv(csv_path, harness.merged_rows(labels, measured, stored))
        progress.close()
        png = harness.plot_csv(csv_path)
        print(f"wrote {csv_path} and {png}")
    print(f"done in {time.perf_counter() - started:.0f} s")


def warm(ops: dict, names: list[str], device: torch.device, quick: bool) -> None:
    """Run every provider of every case and mode of the ops ``names`` once, timing nothing."""
    started = time.perf_counter()
    for op in names:
        setup = harness.setup_of(op, ops[op])
        for case in [c for c in ops[op].CASES if c.quick or not quick]:
            harness.warm_case(op, setup, case, device)
        print(f"warm: {op} done at {time.perf_counter() - started:.0f} s", flush=True)


def format_case(op: str, case: harness.Case, rows: list[Row], copy_gbps: float) -> str:
    ratio = harness.speedups(rows)
    lines = [
        f"\n{op} {case.label} {rows[0].dtype}",
        f"{'provider':<16} {'mode':<9} {'p50 ms':>9} {'[p20, p80]':>19} {'vs eager':>9} "
        f"{'GB/s':>7} {'% copy':>7} {'peak MB':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.provider:<16} {r.mode:<9} {r.p50_ms:>9.3f} "
            f"{f'[{r.p20_ms:.3f}, {r.p80_ms:.3f}]':>19} {ratio[r]:>8.2f}x "
            f"{r.gbps:>7.1f} {100 * r.gbps / copy_gbps:>6.0f}% {r.peak_mb:>8.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
