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


def test_launching_aten_ops_exclude_views_allocations_and_metadata():
    """host_overhead subtracts the aten ops that launch work on a GPU from the triton backend's
    Python: compute ops count, views, allocations and metadata do not."""
    from benchmarks import host_overhead

    for name in ("aten::add", "aten::where", "aten::convolution_backward", "aten::sum",
                 "aten::randint", "aten::copy_", "aten::fill_"):
        assert host_overhead._launching(name), name
    for name in ("aten::view", "aten::transpose", "aten::as_strided", "aten::empty",
                 "aten::empty_strided", "aten::expand", "aten::permute", "aten::select",
                 "aten::item", "aten::detach", "conv2d", "MaskedConv2dFunction"):
        assert not host_overhead._launching(name), name


@pytest.mark.triton
def test_triton_python_figures_with_launches_stubbed():
    """Under TRITON_INTERPRET=1, host_overhead also measures the triton backend's Python:
    every Triton launch and torch._assert_async a no-op inside _launches_stubbed (the kernel's
    output stays unwritten; both restored after), positive figures for each op asked."""
    import os

    from benchmarks import host_overhead

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (make test-triton)")
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def ones(out_ptr):
        tl.store(out_ptr + tl.arange(0, 16), tl.full((16,), 1.0, tl.float32))

    getitem, assert_async = InterpretedFunction.__getitem__, torch._assert_async
    out = torch.zeros(16)
    with host_overhead._launches_stubbed():
        ones[(1,)](out)
        torch._assert_async(torch.tensor(False), "stubbed")
    assert torch.equal(out, torch.zeros(16))  # the launch did not run
    assert InterpretedFunction.__getitem__ is getitem and torch._assert_async is assert_async
    ones[(1,)](out)
    assert torch.equal(out, torch.ones(16))  # it runs again after
    result = host_overhead.measure(("noise", "masked_conv"), rounds=1, block_ms=1.0)
    for figure in host_overhead.FIGURES + host_overhead.TRITON_FIGURES:
        assert set(result[figure]) == {"noise", "masked_conv"}, figure
    assert all(result["pyprune_forward_triton"][op] > 0 for op in ("noise", "masked_conv"))
