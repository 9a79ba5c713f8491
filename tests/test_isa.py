"""The CPU kernels' two instruction-set builds (csrc/cpu/isa.h) give the same results: AVX2
(chosen at run time where the processor has it) against the baseline build forced by
PYPRUNE_CPU_ISA=baseline, forward and backward, on fresh random inputs in every dtype and
layout. Elementwise results and the random streams agree bit for bit."""
from __future__ import annotations

import pytest
import torch

import pyprune

pytestmark = pytest.mark.skipif(
    pyprune.cpu_isa() != "avx2", reason="this processor runs only the baseline CPU kernels"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _input(dtype, layout, shape=(5, 13, 11, 7)):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.randn((shape[0], shape[1], shape[2], 2 * shape[3]), dtype=torch.float64).to(dtype)[..., ::2]
    return x


def _both(monkeypatch, fn):
    """fn() with the AVX2 kernels, then with the baseline ones (fn seeds its own randomness)."""
    with pyprune.use_backend("cpu"):
        monkeypatch.delenv("PYPRUNE_CPU_ISA", raising=False)
        assert pyprune.cpu_isa() == "avx2"
        fast = fn()
        monkeypatch.setenv("PYPRUNE_CPU_ISA", "baseline")
        assert pyprune.cpu_isa() == "baseline"
        base = fn()
    return fast, base


def _grad_run(op, x):
    def run():
        xr = x.detach().clone().requires_grad_(True)
        out = op(xr)
        out = out[0] if isinstance(out, tuple) else out
        g = torch.Generator().manual_seed(7)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        out.backward(grad)
        return out.detach(), xr.grad
    return run


def _assert_same(fast, base):
    for a, b in zip(fast, base):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            a.nan_to_num(), b.nan_to_num()
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_kwta(monkeypatch, dtype, layout, mode):
    x = _input(dtype, layout)
    x[:, ::4, 1, ::3] = float("nan")
    x[:, 1::4, 2, :] = 0.0  # ties at zero
    fast, base = _both(monkeypatch, _grad_run(lambda t: pyprune.kwta(t, 0.3, mode=mode), x))
    _assert_same(fast, base)


def test_kwta_large_groups(monkeypatch):
    """Groups past the sampled-bracket size, split across threads."""
    x = torch.randn(2, 3, 70001)
    fast, base = _both(monkeypatch, _grad_run(lambda t: pyprune.kwta(t, k=777), x))
    _assert_same(fast, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_sap(monkeypatch, dtype, layout, exact):
    x = _input(dtype, layout)

    def op(t):
        return pyprune.sap(t, 0.7, exact=exact, generator=torch.Generator().manual_seed(11))

    fast, base = _both(monkeypatch, _grad_run(op, x))
    _assert_same(fast, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("multiplicative", [False, True], ids=["additive", "multiplicative"])
def test_gaussian_noise(monkeypatch, dtype, multiplicative):
    # An odd length: the last Philox block is partial.
    x = torch.randn(4099, dtype=torch.float64).to(dtype)

    def op(t):
        g = torch.Generator().manual_seed(5)
        return pyprune.gaussian_noise(t, 0.4, multiplicative=multiplicative, generator=g)

    fast, base = _both(monkeypatch, _grad_run(op, x))
    _assert_same(fast, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("hw", [(5, 3), (4, 4), (8, 8), (7, 7), (1, 1)], ids=str)
@pytest.mark.parametrize("classes", [10, 300])
def test_cas(monkeypatch, dtype, layout, train, hw, classes):
    """Every spatial size with a fixed-length row loop, both ways of computing inference
    logits (per sample, or one GEMM for a large classifier)."""
    x = _input(dtype, layout, shape=(6, 24) + hw)
    weight = torch.randn(classes, 24, dtype=torch.float64).to(dtype)
    bias = torch.randn(classes, dtype=torch.float64).to(dtype)
    label = torch.randint(0, classes, (6,)) if train else None

    def run():
        xr = x.detach().clone().requires_grad_(True)
        wr = weight.detach().clone().requires_grad_(True)
        out, logits = pyprune.cas(xr, wr, bias, label)
        g = torch.Generator().manual_seed(3)
        (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum().add(
            logits.double().sum()
        ).backward()
        return out.detach(), logits.detach(), xr.grad, wr.grad

    fast, base = _both(monkeypatch, run)
    _assert_same(fast, base)


def test_magnitude_mask(monkeypatch):
    w = torch.randn(64, 32, 3, 3)
    fast, base = _both(monkeypatch, lambda: (pyprune.magnitude_mask(w, 0.25),))
    _assert_same(fast, base)
