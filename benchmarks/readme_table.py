"""``python -m benchmarks.readme_table``: every stored result as one Markdown table.

Reads ``benchmarks/results/<device>/<op>.csv`` for every device folder; the speed-up is over
the eager row of the same op, shape and mode, and "% copy" relates GB/s to the copy bandwidth
measured in the same run (``copy.csv``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import harness

HEADER = ("device", "date", "op", "shape", "dtype", "mode", "provider", "p50 ms", "vs eager",
          "GB/s", "% copy")


def table(results: Path, devices: list[str] | None = None) -> str:
    """The rows of every ``<results>/<device>/<op>.csv``, or only of the given device folders."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for path in sorted(results.glob("*/*.csv")):
        if path.name == "copy.csv" or (devices and path.parent.name not in devices):
            continue
        copy_csv = path.with_name("copy.csv")
        copy_gbps = harness.read_csv(copy_csv)[0].gbps if copy_csv.exists() else None
        rows = harness.read_csv(path)
        ratio = harness.speedups(rows)
        for r in rows:
            share = f"{100 * r.gbps / copy_gbps:.0f}%" if copy_gbps else "-"
            cells = (r.device, r.date[:10], r.op, r.shape, r.dtype, r.mode, r.provider,
                     f"{r.p50_ms:.3f}", f"{ratio[r]:.2f}x", f"{r.gbps:.1f}", share)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table",
                                     description="Print the stored benchmark results as Markdown.")
    parser.add_argument("--results", type=Path, default=harness.RESULTS,
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--device", action="append",
                        help="results folder name, e.g. cpu (repeatable; default: all)")
    args = parser.parse_args()
    print(table(args.results, args.device))


if __name__ == "__main__":
    main()
