"""Shared fixtures: backend x device parametrisation and the dtype tolerance table."""
from __future__ import annotations

import os

import pytest
import torch

import pyprune
from pyprune import _backend

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (atol, rtol) for outputs computed in the input dtype; selections are exact in every dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _param(device: str, backend: str):
    marks = []
    if backend == "triton":
        marks.append(pytest.mark.triton)
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    reason = _backend.unavailable_reason(backend, device) if device != "cuda" or HAS_CUDA else "no CUDA device"
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param((device, backend), marks=marks, id=f"{device}-{backend}")


# Every backend on every device, skipped with its reason where it cannot run.
DEVICE_BACKENDS = [
    _param("cpu", "reference"),
    _param("cpu", "cpu"),
    _param("cpu", "triton"),
    _param("cuda", "reference"),
    _param("cuda", "cuda"),
    _param("cuda", "triton"),
]


@pytest.fixture(params=DEVICE_BACKENDS)
def device_backend(request):
    """(device, backend) with the backend forced for the test's duration."""
    device, backend = request.param
    with pyprune.use_backend(backend):
        yield device, backend


def dtypes_for(backend: str) -> list[torch.dtype]:
    return list(_backend.DTYPES.get(backend, tuple(TOLERANCES)))


def assert_half_rounds_to_nearest(op, device_backend, shape, seed) -> None:
    """op(x, generator) in float16 and bfloat16 is op in float32 rounded to nearest even: x
    exact in the 16-bit type (randn * 4 of a seeded generator), the same generator seed. A
    truncating cast (the Triton interpreter's bfloat16 one) biases the results toward zero."""
    device, backend = device_backend
    x32 = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 4).to(device)
    for dtype in (torch.float16, torch.bfloat16):
        if dtype not in dtypes_for(backend):
            continue
        x16 = x32.to(dtype)
        want = op(x16.float(), torch.Generator(device).manual_seed(1))
        got = op(x16, torch.Generator(device).manual_seed(1))
        assert torch.equal(got, want.to(dtype)), dtype


def compile_and_backward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch.compile(fullgraph=True) a model of random layers, run it and backprop: the output
    must be finite and every parameter must get a gradient. Returns the compiled output."""
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    return out


@pytest.fixture(autouse=True)
def full_float32_convolutions(request):
    """cuDNN runs float32 convolutions in TF32 by default on sm_80+ (10-bit mantissa, errors
    near 1e-3), which the float32 tolerances of TOLERANCES cannot meet against the float64
    reference. Tests run with TF32 off; tests marked ``tf32`` keep PyTorch's default and
    compare with TF32 tolerances (``TF32_TOLERANCE``)."""
    if request.node.get_closest_marker("tf32") is not None:
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


# (atol, rtol) per unit of sqrt(reduction length) for TF32 products: inputs rounded to 10
# mantissa bits (relative error 2^-11 each), sums of random-signed terms growing as sqrt(K).
TF32_TOLERANCE = (2e-3, 2e-3)


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's constexprs and options and its grid,
    then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.grids = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            self.grids.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


def spy_conv_launches(monkeypatch) -> LaunchSpy:
    from pyprune.triton_kernels import masked_conv as kernels

    spy = LaunchSpy(kernels._masked_conv2d_forward_kernel)
    monkeypatch.setattr(kernels, "_masked_conv2d_forward_kernel", spy)
    return spy


class AtenCalls:
    """The names of the ops run inside it, those inside other ops (a custom op's body)
    included (torch.profiler's CPU events: "aten::flip", ...), e.g. to check that a path makes
    no copy of some kind."""

    def __enter__(self) -> "AtenCalls":
        self.calls: list[str] = []
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        self.calls = [event.name for event in self._profile.events()]
