"""benchmarks/kernel_times.py's aggregation of profiler events (CPU only: fake events)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks import kernel_times


def _event(name, start, end, gpu=True):
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind,
                           time_range=SimpleNamespace(start=start, end=end))


def test_aggregate_sums_gpu_activities_per_call():
    # Two calls: each a 3 us and a 1 us kernel; host ops ignored; the span runs from the first
    # kernel's start (10) to the last one's end (40).
    events = [_event("aten::topk", 0, 50, gpu=False),
              _event("select", 10, 13), _event("write", 14, 15),
              _event("select", 30, 33), _event("write", 39, 40)]
    rows = kernel_times.aggregate(events, runs=2)
    assert [r.kernel for r in rows] == [kernel_times.ALL, "select", "write"]
    total, select, write = rows
    assert total.launches_per_call == 2 and total.device_us_per_call == pytest.approx(4.0)
    assert total.span_us_per_call == pytest.approx(15.0)
    assert select.launches_per_call == 1 and select.device_us_per_call == pytest.approx(3.0)
    assert write.device_us_per_call == pytest.approx(1.0)


def test_aggregate_without_gpu_activity_is_empty():
    assert kernel_times.aggregate([_event("aten::add", 0, 5, gpu=False)], runs=1) == []


def test_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit):
        kernel_times.main(["--op", "kwta"])


@pytest.mark.parametrize("name", ["kernel_times.csv", "host_costs.csv"])
def test_readme_table_skips_the_other_csvs(tmp_path, name):
    """A results folder holding kernel_times.csv or host_costs.csv (make gpu bundles both)
    still tables its op CSVs: those have columns of their own."""
    from benchmarks import harness, readme_table

    folder = tmp_path / "nvidia-h200"
    if name == "kernel_times.csv":
        harness.write_table(folder / name, kernel_times.COLUMNS,
                            [("kwta", "8x64x32x32", "forward", "eager", kernel_times.ALL, 1, 2.0,
                              3.0)])
    else:
        folder.mkdir()
        (folder / name).write_text("name,host_us_per_call,device,torch,date\n"
                                   "aten,9.0,cuda,2.11.0,2026-12-04\n")
    info = harness.RunInfo.create(torch.device("cpu"), quick=True)
    row = info.row("kwta", "eager", "forward", harness.Case(shape=(1,)),
                   harness.Timing(1.0, 1.0, 1.0), 1.0, 0.0)
    harness.write_csv(folder / "kwta.csv", [row])
    text = readme_table.table(tmp_path)
    assert text.count("\n") == 2 and "| kwta |" in text


def test_launch_costs_cover_every_op_and_write_their_csv(tmp_path, monkeypatch):
    """host_overhead --launches: a positive host time a call for the aten launch, every op on
    each backend of the device and the eager k-WTA and noise calls; the CSV holds them all."""
    import csv
    import sys

    import pyprune
    from benchmarks import host_overhead

    costs = host_overhead.launch_costs(torch.device("cpu"), rounds=1, calls_per_block=2)
    backends = [b for b in pyprune.backends("cpu") if b != "reference"]
    want = {"aten", "kwta:eager", "noise:eager"} | {
        f"{op}:{b}" for op in host_overhead.OPS for b in backends}
    if "triton" in backends:
        want |= {"triton", "counters"}
    assert want <= set(costs) and all(us > 0 for us in costs.values())
    out = tmp_path / "host_costs.csv"
    monkeypatch.setattr(sys, "argv", ["host_overhead", "--launches", "--rounds", "1",
                                      "--out", str(out)])
    monkeypatch.setattr(host_overhead, "launch_costs",
                        lambda device, rounds: {"aten": 1.5, "kwta:cpu": 20.0})
    host_overhead.main()
    rows = list(csv.DictReader(out.open()))
    assert [(r["name"], r["host_us_per_call"], r["device"]) for r in rows] == [
        ("aten", "1.50", "cpu"), ("kwta:cpu", "20.00", "cpu")]
