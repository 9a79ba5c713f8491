"""pytest-benchmark view of every op's quick cases: ``pytest benchmarks/ --benchmark-only``.

Same setup factories as ``python -m benchmarks`` (every ``benchmarks/<op>.py`` is picked up), timed
by pytest-benchmark's wall clock with a device synchronize after each run on CUDA. One group
per op, case and mode, eager included, so each group's table compares the providers.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = harness.discover_ops()
CASES = [
    pytest.param(op, case, id=f"{op}-{case.label.replace(' ', '-')}")
    for op, module in OPS.items()
    for case in module.CASES
    if case.quick
]


@pytest.mark.parametrize("provider", harness.providers(DEVICE.type))
@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize(("op", "case"), CASES)
def test_benchmark(benchmark, op: str, case: harness.Case, mode: str, provider: str) -> None:
    step = harness.setup_of(op, OPS[op])(case, provider, mode, DEVICE)
    benchmark.group = f"{op} {case.label} {mode}"
    benchmark.extra_info["bytes"] = step.bytes
    benchmark.pedantic(
        harness.synchronized(step.fn, DEVICE),
        warmup_rounds=harness.WARMUP_RUNS,
        rounds=harness.MIN_RUNS,
    )
