"""Convolution with an unstructured bool weight mask on the CPU (torch.ops.pyprune._sparse_conv2d
behind pyprune.masked_conv2d(..., weight_mask=bool)): the direct sparse kernel and the dense
fallback against pyprune.reference (float64), inf/NaN, gradients, opcheck, compile, both
instruction sets, bad input."""
from __future__ import annotations

import pytest
import torch

import pyprune
from pyprune import reference
from pyprune.nn import MaskedConv2d

from .conftest import TOLERANCES, compile_and_backward

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation): odd sizes, strides 1-3, dilation,
# 1x1 and 5x5 kernels, outputs from 1x1 to past one tile of the kernel's run.
GEOMETRIES = [
    (3, 5, 7, 9, 6, 3, 1, 1, 1),
    (2, 8, 16, 8, 8, 3, 2, 1, 1),
    (2, 6, 4, 7, 11, 5, 1, 2, 2),
    (3, 4, 6, 5, 5, 1, 1, 0, 1),
    (2, 3, 5, 13, 10, (3, 1), (2, 1), (1, 0), 1),
    (1, 4, 3, 1, 1, 1, 1, 0, 1),
    (2, 3, 4, 2, 9, 3, 3, 1, 1),
    (2, 16, 8, 17, 19, 3, 1, 1, 1),
    (1, 2, 2, 3, 3, 3, 1, 2, 2),
    # More than one vector of samples (eight float32, four float64) for the interleaved layout,
    # with a partial last group; stride 2.
    (19, 5, 6, 6, 7, 3, 1, 1, 1),
    (10, 4, 8, 9, 9, 3, 2, 1, 1),
]
# The sparse kernel on each of its layouts (per-sample runs, batch-interleaved), the dense
# engine, or the density rule's choice.
PATHS = ["sparse-run", "sparse-interleaved", "dense", "auto"]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _inputs(geom, dtype, density, seed=0, bias=True, channels_last=False):
    n, cin, cout, h, w, k, *_ = geom
    kh, kw = _pair(k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, kh, kw, generator=gen).to(dtype)
    mask = torch.rand(weight.shape, generator=gen) < density
    b = torch.randn(cout, generator=gen).to(dtype) if bias else None
    return x, weight, mask, b, gen


def _args(geom):
    return tuple(_pair(v) for v in geom[6:9])


def _expected(x, weight, mask, bias, geom):
    return reference.masked_conv2d(x.double(), weight.double(),
                                   None if bias is None else bias.double(), *_args(geom),
                                   weight_mask=mask)


def _close(got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol * 8, rtol=rtol * 8, equal_nan=True)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The sparse kernel (on one layout) or the dense engine forced, or the rules' choice."""
    if request.param != "auto":
        kind, _, layout = request.param.partition("-")
        monkeypatch.setenv("PYPRUNE_SPARSE_CONV", kind)
        if layout:
            monkeypatch.setenv("PYPRUNE_SPARSE_LAYOUT", layout)
    return request.param


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_forward(path, geom, density, dtype):
    x, weight, mask, bias, _ = _inputs(geom, dtype, density)
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    assert got.dtype == dtype
    _close(got, _expected(x, weight, mask, bias, geom), dtype)


@pytest.mark.parametrize("geom", GEOMETRIES[:4], ids=str)
def test_layouts_and_no_bias(path, geom):
    """channels_last in gives channels_last out; strided (sliced) input; no bias."""
    x, weight, mask, _, _ = _inputs(geom, torch.float64, 0.3, bias=False, channels_last=True)
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(x, weight, None, *_args(geom), weight_mask=mask)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _close(got, _expected(x, weight, mask, None, geom), torch.float64)
        wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=torch.float64)
        sliced = wide[..., ::2]
        got = pyprune.masked_conv2d(sliced, weight, None, *_args(geom), weight_mask=mask)
        _close(got, _expected(sliced, weight, mask, None, geom), torch.float64)


def test_large_layer_matches(path):
    """A ResNet-sized layer at low density (the shape the density rule sends to the kernel)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 32, 32, generator=gen)
    weight = torch.randn(64, 64, 3, 3, generator=gen)
    mask = torch.rand(weight.shape, generator=gen) < 0.05
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(x, weight, padding=1, weight_mask=mask)
    want = reference.masked_conv2d(x.double(), weight.double(), padding=1, weight_mask=mask)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[9]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nonfinite_input(path, geom, dtype):
    """inf and NaN in x: 0 * inf at a masked weight gives NaN, as in the reference; masked
    weights holding inf or NaN take no part; the finite samples next to them (in the same
    vector of the interleaved layout) are untouched."""
    x, weight, mask, bias, _ = _inputs(geom, dtype, 0.3)
    x[1, 2, 4, 3] = float("inf")
    x[2, 0, 0, 0] = float("nan")
    x[-1, 1, 2, 2] = float("-inf")
    weight[~mask] = float("inf")
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    want = _expected(x, weight, mask, bias, geom)
    assert torch.equal(got.isnan(), want.isnan())
    finite = [n for n in range(x.shape[0]) if n not in (1, 2, x.shape[0] - 1)]
    assert not got[finite].isnan().any()
    _close(got, want, dtype)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradients(path, geom, dtype):
    """grad_x, grad_weight (0 at masked weights) and grad_bias against the reference's autograd:
    stride 1 takes the sparse kernel for both, other strides for grad_weight only."""
    x, weight, mask, bias, gen = _inputs(geom, dtype, 0.4, channels_last=geom[0] == 2)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(*leaves, *_args(geom), weight_mask=mask)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, leaves, grad.to(dtype))
    assert grads[0].stride() == leaves[0].stride()
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = reference.masked_conv2d(*ref, *_args(geom), weight_mask=mask)
    for g, w in zip(grads, torch.autograd.grad(want, ref, grad)):
        _close(g, w, dtype)
    assert torch.all(grads[1][~mask] == 0)


def test_gradient_of_one_input(path):
    """Only grad_x or only grad_weight asked for."""
    geom = GEOMETRIES[0]
    x, weight, mask, bias, gen = _inputs(geom, torch.float64, 0.3)
    for wanted in (0, 1):
        leaves = [x.clone(), weight.clone()]
        leaves[wanted].requires_grad_()
        with pyprune.use_backend("cpu"):
            got = pyprune.masked_conv2d(*leaves, bias, *_args(geom), weight_mask=mask)
        (g,) = torch.autograd.grad(got.sum(), leaves[wanted])
        ref = [x.clone(), weight.clone()]
        ref[wanted].requires_grad_()
        (w,) = torch.autograd.grad(
            reference.masked_conv2d(*ref, bias, *_args(geom), weight_mask=mask).sum(), ref[wanted])
        _close(g, w, torch.float64)


@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[9]], ids=str)
def test_nonfinite_gradients(path, geom):
    """inf in x: the weight gradient at kept weights is what the reference gives (also with
    the last, partial vector of samples after one holding inf)."""
    x, weight, mask, bias, gen = _inputs(geom, torch.float64, 0.3)
    x[1, 2, 4, 3] = float("inf")
    x[min(13, x.shape[0] - 1), 0, 3, 3] = float("-inf")
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    with pyprune.use_backend("cpu"):
        got = pyprune.masked_conv2d(*leaves, bias, *_args(geom), weight_mask=mask)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    (gw,) = torch.autograd.grad(got, leaves[1], grad)
    ref = weight.clone().requires_grad_()
    (want,) = torch.autograd.grad(
        reference.masked_conv2d(x, ref, bias, *_args(geom), weight_mask=mask), ref, grad)
    want = torch.where(mask, want, torch.zeros((), dtype=torch.float64))
    assert torch.equal(gw.isnan(), want.isnan()) and torch.equal(gw.isinf(), want.isinf())
    _close(gw, want, torch.float64)


def test_gradcheck(path):
    geom = (2, 3, 4, 5, 4, 3, 2, 1, 1)
    x, weight, mask, bias, _ = _inputs(geom, torch.float64, 0.5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with pyprune.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: pyprune.masked_conv2d(a, b, c, 2, 1, weight_mask=mask), leaves)


def test_opcheck(path):
    geom = GEOMETRIES[0]
    x, weight, mask, bias, _ = _inputs(geom, torch.float32, 0.3)
    for b in (bias, None):
        args = (x.clone().requires_grad_(), weight.clone().requires_grad_(), mask,
                None if b is None else b.clone().requires_grad_(), [1, 1], [1, 1], [1, 1])
        torch.library.opcheck(torch.ops.pyprune._sparse_conv2d.default, args)
    grad = torch.randn(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.pyprune._sparse_conv2d_backward.default,
                              (grad, x, weight, mask, [1, 1], [1, 1], [1, 1], *flags))


def test_module_and_compile(path):
    """MaskedConv2d with a bool weight mask, eager and torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    conv = MaskedConv2d.from_conv(torch.nn.Conv2d(6, 8, 3, padding=1))
    conv.weight_mask = torch.rand(conv.weight.shape) < 0.2
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 6, 9, 9)
    with pyprune.use_backend("cpu"):
        eager = model(x)
        got = compile_and_backward(model, x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    assert torch.all(conv.weight.grad[~conv.weight_mask] == 0)


@pytest.mark.parametrize("layout", ["run", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("geom", [GEOMETRIES[7], GEOMETRIES[1], GEOMETRIES[5], GEOMETRIES[9]],
                         ids=str)
def test_instruction_sets_agree(monkeypatch, dtype, geom, layout):
    """The AVX2 build (fused multiply-adds) and the baseline agree with each other and with the
    reference to rounding, forward and backward."""
    monkeypatch.setenv("PYPRUNE_SPARSE_CONV", "sparse")
    monkeypatch.setenv("PYPRUNE_SPARSE_LAYOUT", layout)
    stride, padding, dilation = (list(_pair(v)) for v in geom[6:9])
    x, weight, mask, bias, _ = _inputs(geom, dtype, 0.3)
    y = torch.ops.pyprune._sparse_conv2d(x, weight, mask, bias, stride, padding, dilation)
    grad = torch.randn(y.shape, dtype=dtype)
    got = {}
    for isa in ("avx2", "baseline"):
        monkeypatch.setenv("PYPRUNE_CPU_ISA", isa)
        got[isa] = (torch.ops.pyprune._sparse_conv2d(x, weight, mask, bias, stride, padding, dilation),
                    *torch.ops.pyprune._sparse_conv2d_backward(grad, x, weight, mask, stride,
                                                               padding, dilation, True, True))
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), stride, padding,
                                   dilation, weight_mask=mask)
    for isa, outs in got.items():
        _close(outs[0], want, dtype)
        for a, b in zip(outs, got["baseline"]):
            _close(a, b.double(), dtype)


@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[9], GEOMETRIES[10]], ids=str)
def test_layouts_agree_exactly(monkeypatch, geom):
    """Both layouts sum each output's kept weights in the same order: the same bits."""
    monkeypatch.setenv("PYPRUNE_SPARSE_CONV", "sparse")
    x, weight, mask, bias, _ = _inputs(geom, torch.float32, 0.3)
    got = []
    for layout in ("run", "interleaved"):
        monkeypatch.setenv("PYPRUNE_SPARSE_LAYOUT", layout)
        got.append(torch.ops.pyprune._sparse_conv2d(x, weight, mask, bias,
                                                    *(list(a) for a in _args(geom))))
    assert torch.equal(got[0], got[1])


def test_interleaved_rule(monkeypatch):
    """The layout rule's own choice (no layout forced) on both sides of it: a full vector of
    samples at 8x8 (interleaved), too few samples, a 20x20 output (runs)."""
    monkeypatch.setenv("PYPRUNE_SPARSE_CONV", "sparse")
    gen = torch.Generator().manual_seed(3)
    for n, h in ((16, 8), (3, 8), (16, 20)):
        x = torch.randn(n, 8, h, h, generator=gen)
        weight = torch.randn(8, 8, 3, 3, generator=gen)
        mask = torch.rand(weight.shape, generator=gen) < 0.2
        got = torch.ops.pyprune._sparse_conv2d(x, weight, mask, None, [1, 1], [1, 1], [1, 1])
        want = reference.masked_conv2d(x.double(), weight.double(), padding=1, weight_mask=mask)
        _close(got, want, torch.float32)


def test_empty_batch(path):
    x = torch.randn(0, 3, 5, 5)
    weight = torch.randn(4, 3, 3, 3)
    got = torch.ops.pyprune._sparse_conv2d(x, weight, torch.rand(weight.shape) < 0.5, None,
                                           [1, 1], [1, 1], [1, 1])
    assert got.shape == (0, 4, 5, 5)


def test_bad_input():
    x, weight = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    op = torch.ops.pyprune._sparse_conv2d
    with pytest.raises(RuntimeError, match="weight_mask must be bool with weight's shape"):
        op(x, weight, torch.ones(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="weight_mask must be bool with weight's shape"):
        op(x, weight, torch.ones(4, 3, 3, 1, dtype=torch.bool), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, weight, torch.ones(4, 3, 3, 3, dtype=torch.bool), torch.zeros(3), [1, 1], [1, 1],
           [1, 1])
    with pytest.raises(RuntimeError, match="weight expects 3 input channels, x has 2"):
        op(x[:, :2], weight, torch.ones(4, 3, 3, 3, dtype=torch.bool), None, [1, 1], [1, 1],
           [1, 1])
