"""benchmarks/ncu_targets.py: its targets name real benchmark cases, ncu's arguments, and the
summary of an ncu details CSV (a synthetic one: CPU only)."""
from __future__ import annotations

import csv
import io

import pytest

from benchmarks import harness, ncu_targets

HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
          "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name",
          "Metric Unit", "Metric Value"]


def test_targets_resolve_to_benchmark_cases():
    resolved = ncu_targets.resolve(harness.discover_ops())
    assert len(resolved) == len(ncu_targets.TARGETS)
    assert all(case.label == t.case for t, case in resolved)


def test_ncu_args_filter_the_targets_kernels():
    args = ncu_targets.ncu_args()
    assert args[:2] == ["--profile-from-start", "off"]
    regex = args[args.index("-k") + 1]
    assert all(t.kernel in regex for t in ncu_targets.TARGETS)
    metrics = args[args.index("--metrics") + 1].split(",")
    assert len(metrics) == len(ncu_targets.STALLS)
    assert args[-3:] == ["--csv", "--page", "details"]


def _ncu_csv(kernels) -> str:
    out = io.StringIO()
    out.write("==PROF== Connected to process 1\n")  # ncu's log lines come first
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    writer.writerow(HEADER)
    for kid, (name, rows) in enumerate(kernels):
        for section, metric, unit, value in rows:
            writer.writerow([kid, 1, "python3", "h", name, 1, 7, "(512, 1, 1)", "(256, 1, 1)", 0,
                             "9.0", section, metric, unit, value])
    return out.getvalue()


def test_summarize_reads_metrics_and_stalls_in_launch_order(tmp_path):
    stall = ncu_targets._STALL_METRIC
    first = [("GPU Speed Of Light Throughput", "Duration", "msecond", "0.13"),
             ("GPU Speed Of Light Throughput", "DRAM Throughput", "%", "41.5"),
             ("Occupancy", "Achieved Occupancy", "%", "45.2"),
             ("Command line profiler metrics", stall.format("barrier"), "", "7.5"),
             ("Command line profiler metrics", stall.format("long_scoreboard"), "", "12.25"),
             ("Command line profiler metrics", stall.format("wait"), "", "1.0"),
             ("Command line profiler metrics", stall.format("drain"), "", "0.5")]
    second = [("GPU Speed Of Light Throughput", "Duration", "usecond", "1,234.5")]
    path = tmp_path / "ncu.csv"
    path.write_text(_ncu_csv([("kwta_block_kernel", first), ("kwta_block_kernel", second)]))
    rows = ncu_targets.summarize(path)
    assert [r["us"] for r in rows] == ["130.0", "1234.5"]
    assert rows[0]["dram %"] == "41.5" and rows[0]["occupancy %"] == "45.2"
    assert rows[0]["stalls"] == "long_scoreboard 12.2, barrier 7.5, wait 1.0"
    assert rows[0]["target"] == ncu_targets.TARGETS[0].label
    assert rows[1]["target"] == ncu_targets.TARGETS[1].label


def test_summarize_flags_a_kernel_out_of_order(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(_ncu_csv([("sap_merge_kernel", [("S", "Duration", "usecond", "5")])]))
    [row] = ncu_targets.summarize(path)
    assert "(expected kwta_block_kernel)" in row["target"]


def test_summarize_without_csv_raises(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text("==ERROR== ERR_NVGPUCTRPERM\n")
    with pytest.raises(ValueError, match="no ncu CSV"):
        ncu_targets.summarize(path)
