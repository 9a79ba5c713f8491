"""Masked convolution on every backend against pyprune.reference (float64): static, per-sample
and mixed channel masks, weight masks, soft masks, gradients, opcheck, compile, bad input, the
modules MaskedConv2d and ChannelGate."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import pyprune
from pyprune import reference
from pyprune.nn import ChannelGate, MaskedConv2d
from pyprune.ops.masked_conv import _OPS

from .conftest import (DEVICE_BACKENDS, TF32_TOLERANCE, TOLERANCES, AtenCalls, LaunchSpy,
                       compile_and_backward, dtypes_for, spy_conv_launches)

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups): odd and power-of-2 sizes.
GEOMETRIES = [
    (3, 5, 7, 9, 6, 3, 1, 1, 1, 1),
    (2, 8, 16, 8, 8, 3, 2, 1, 1, 1),
    (2, 6, 4, 7, 11, 5, 1, 2, 2, 1),
    (3, 4, 6, 5, 5, 1, 1, 0, 1, 1),
    (2, 6, 9, 6, 7, 3, 1, 1, 1, 3),
    (2, 4, 4, 6, 6, 3, 1, 1, 1, 4),
]
# Channel-mask kinds: None, all kept, all masked, static random, per-sample random (one sample
# with nothing kept), and per-sample all kept.
KINDS = ["none", "all", "nothing", "static", "sample", "sample_all"]


def _mask(kind: str, n: int, c: int, gen: torch.Generator, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        m = torch.ones(c, dtype=torch.bool)
    elif kind == "nothing":
        m = torch.zeros(c, dtype=torch.bool)
    elif kind == "static":
        m = torch.rand(c, generator=gen) < 0.5
    elif kind == "sample_all":
        m = torch.ones(n, c, dtype=torch.bool)
    else:
        m = torch.rand(n, c, generator=gen) < 0.5
        m[0] = False
    return m.to(device)


def _inputs(geom, dtype, device, seed=0, bias=True):
    n, cin, cout, h, w, k, *_, groups = geom
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype).to(device)
    weight = torch.randn(cout, cin // groups, k, k, generator=gen).div(k).to(dtype).to(device)
    b = torch.randn(cout, generator=gen).to(dtype).to(device) if bias else None
    return x, weight, b, gen


def _conv_args(geom):
    *_, stride, padding, dilation, groups = geom
    return stride, padding, dilation, groups


def _expected(x, weight, bias, geom, **masks):
    d = {k: (None if v is None else (v if v.dtype == torch.bool else v.double()))
         for k, v in masks.items()}
    y = reference.masked_conv2d(x.double(), weight.double(),
                                None if bias is None else bias.double(), *_conv_args(geom), **d)
    return y


def _close(got, want, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    # A conv output sums C_in * k * k products: scale the float tolerance with it.
    torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol * scale)


def _cases(device_backend, quick):
    device, backend = device_backend
    geoms = GEOMETRIES[:3] if quick else GEOMETRIES
    pairs = list(itertools.product(KINDS, KINDS))
    if backend == "triton":  # the interpreter is slow: a spread of the pairs
        pairs = pairs[::3]
    return device, backend, geoms, pairs


@pytest.fixture(params=["auto", "per_sample", "dense"])
def cpu_path(request, monkeypatch):
    """The CPU kernel's choice for per-sample masks: its own, or forced either way."""
    if request.param != "auto":
        monkeypatch.setenv("PYPRUNE_MASKED_CONV_CPU", request.param)
    return request.param


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_reference(device_backend, layout, cpu_path):
    device, backend, geoms, pairs = _cases(device_backend, quick=layout != "contiguous")
    if cpu_path != "auto" and backend != "cpu":
        pytest.skip("the path choice is the cpu backend's")
    for dtype in dtypes_for(backend):
        for gi, geom in enumerate(geoms):
            x, weight, bias, gen = _inputs(geom, dtype, device, seed=gi)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":
                x = torch.cat([x, x], dim=3)[..., ::2]
            n, cin, cout = geom[:3]
            for ki, ko in pairs:
                masks = dict(in_mask=_mask(ki, n, cin, gen, device),
                             out_mask=_mask(ko, n, cout, gen, device))
                got = pyprune.masked_conv2d(x, weight, bias, *_conv_args(geom), **masks)
                want = _expected(x, weight, bias, geom, **masks)
                assert got.shape == want.shape and got.dtype == dtype
                _close(got, want, dtype, scale=4.0)
                if masks["out_mask"] is not None:  # masked outputs are exactly zero
                    om = masks["out_mask"]
                    om = om.view(1, -1) if om.dim() == 1 else om
                    assert (got.transpose(0, 1)[~om.T.expand(cout, n)] == 0).all()
                if layout == "channels_last" and geom[-1] == 1 and backend != "reference":
                    assert got.is_contiguous(memory_format=torch.channels_last)


def test_folded_weight_mask_keeps_the_weight_tangent(device_backend):
    """A bool weight mask that folds into the weight (groups > 1: the dense engine runs on the
    folded weight) under forward-mode AD in the weight (torch.func.jvp and
    torch.autograd.forward_ad): the tangent is the reference's, not dropped by the fold (its
    bit-pattern form carries none), or, where pyprune's kernel runs instead (triton), the
    op's clear refusal."""
    import torch.autograd.forward_ad as fwAD

    device, backend = device_backend
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 5, generator=gen).to(device)
    weight = torch.randn(4, 2, 3, 3, generator=gen).to(device)
    mask = (torch.rand(4, 2, 3, 3, generator=gen) < 0.5).to(device)
    tangent = torch.randn(weight.shape, generator=gen).to(device)

    def f(w):
        return pyprune.masked_conv2d(x, w, None, 1, 1, 1, 2, weight_mask=mask)

    want = torch.func.jvp(
        lambda w: reference.masked_conv2d(x.double(), w, None, 1, 1, 1, 2, weight_mask=mask),
        (weight.double(),), (tangent.double(),))[1]
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="masked_conv2d: forward-mode AD"):
            torch.func.jvp(f, (weight,), (tangent,))
        return
    _close(torch.func.jvp(f, (weight,), (tangent,))[1], want, torch.float32, scale=8.0)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(f(fwAD.make_dual(weight, tangent))).tangent
    assert dual is not None
    _close(dual, want, torch.float32, scale=8.0)


def test_soft_in_mask_gradient_sees_unread_inputs(device_backend):
    """A shared float in_mask's gradient is sum(grad_u * x) over every input position, as the
    reference's x * in_mask gives it: an inf or NaN where no output reads (a dilation gap, a
    stride past the kernel) makes it NaN there (0 * inf), finite elsewhere."""
    device, backend = device_backend
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[[[0.0, inf, 0.0, nan, 1e-3]], [[-1.4, 0.4, 0.8, -0.7, 1.0]],
                       [[-0.6, 30.0, 1.0, 0.0, -1.1]]]], device=device)
    weight = torch.tensor([1.54, -0.29, -2.18, 0.57, -1.08, -1.40, 0.40, 0.84, -0.72],
                          device=device).view(3, 1, 1, 3)
    for geometry in (dict(dilation=(1, 2), groups=3), dict(stride=(1, 2), groups=3)):
        grads = []
        for b in (backend, "reference"):
            m = torch.tensor([1.45, 1.06, 0.69], device=device, requires_grad=True)
            with pyprune.use_backend(b):
                y = pyprune.masked_conv2d(x, weight, None, in_mask=m, **geometry)
            y.sum().backward()
            grads.append(m.grad)
        got, want = grads
        assert want[0].isnan() and torch.equal(got.isnan(), want.isnan()), (geometry, got, want)
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-5)


def test_masked_input_channels_do_not_leak(device_backend):
    """inf and NaN in a masked input channel take no part: the mask is structural."""
    device, backend = device_backend
    geom = GEOMETRIES[0]
    x, weight, bias, gen = _inputs(geom, torch.float32, device)
    x[:, 1] = float("inf")
    x[1, 3] = float("nan")
    static = torch.ones(5, dtype=torch.bool, device=device)
    static[1] = static[3] = False
    per_sample = torch.ones(3, 5, dtype=torch.bool, device=device)
    per_sample[:, 1] = False
    per_sample[1, 3] = False
    for in_mask in (static, per_sample):
        for out_mask in (None, _mask("sample", 3, 7, gen, device)):
            got = pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=in_mask, out_mask=out_mask)
            assert torch.isfinite(got).all()
            _close(got, _expected(x, weight, bias, geom, in_mask=in_mask, out_mask=out_mask),
                   torch.float32, scale=4.0)


@pytest.mark.parametrize("soft", ["in_static", "in_sample", "out_static", "out_sample", "weight",
                                  "weight_bool"])
def test_soft_and_weight_masks(device_backend, soft):
    device, backend = device_backend
    for geom in (GEOMETRIES[0], GEOMETRIES[4]):
        n, cin, cout = geom[:3]
        dtype = torch.float32
        x, weight, bias, gen = _inputs(geom, dtype, device)
        masks = {}
        if soft == "in_static":
            masks["in_mask"] = torch.rand(cin, generator=gen).to(device)
        elif soft == "in_sample":
            masks["in_mask"] = torch.rand(n, cin, generator=gen).to(device)
        elif soft == "out_static":
            masks["out_mask"] = torch.rand(cout, generator=gen).to(device)
        elif soft == "out_sample":
            masks["out_mask"] = torch.rand(n, cout, generator=gen).to(device)
        elif soft == "weight":
            masks["weight_mask"] = torch.rand(weight.shape, generator=gen).to(device)
        else:
            masks["weight_mask"] = (torch.rand(weight.shape, generator=gen) < 0.5).to(device)
        # a bool channel mask alongside the soft one
        masks.setdefault("out_mask", _mask("sample", n, cout, gen, device))
        got = pyprune.masked_conv2d(x, weight, bias, *_conv_args(geom), **masks)
        _close(got, _expected(x, weight, bias, geom, **masks), dtype, scale=4.0)


@pytest.mark.parametrize("kinds", [("none", "none"), ("static", "static"), ("sample", "sample"),
                                   ("static", "sample"), ("sample", "nothing"),
                                   ("nothing", "static")], ids=str)
def test_gradients(device_backend, kinds, cpu_path):
    """Gradients of x, weight and bias against the reference's autograd, in float64 where the
    backend has it (float32 otherwise); bool masks get none."""
    device, backend = device_backend
    if cpu_path != "auto" and backend != "cpu":
        pytest.skip("the path choice is the cpu backend's")
    dtype = torch.float64 if torch.float64 in dtypes_for(backend) else torch.float32
    for geom in (GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[4]):
        x, weight, bias, gen = _inputs(geom, dtype, device)
        n, cin, cout = geom[:3]
        masks = dict(in_mask=_mask(kinds[0], n, cin, gen, device),
                     out_mask=_mask(kinds[1], n, cout, gen, device))
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        got = pyprune.masked_conv2d(*leaves, *_conv_args(geom), **masks)
        grad = torch.randn(got.shape, generator=gen).to(dtype).to(device)
        grads = torch.autograd.grad(got, leaves, grad)
        ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
        want = reference.masked_conv2d(*ref, *_conv_args(geom), **masks)
        wants = torch.autograd.grad(want, ref, grad.double())
        for g, w in zip(grads, wants):
            _close(g, w, dtype, scale=8.0)


def test_double_backward(device_backend):
    """Differentiating the convolution's gradient (a gradient penalty) gives the reference's
    second derivatives (float64), through the public function and through the ops themselves.
    The second derivatives of this loss reach 1e5 while single elements cancel to near zero:
    the float32 result is compared with a tolerance relative to the largest of them."""
    device, backend = device_backend
    x = torch.randn(2, 3, 6, 6, device=device)
    weight = torch.randn(4, 3, 3, 3, device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    for kwargs in (dict(out_mask=mask), dict(weight_mask=torch.rand(weight.shape, device=device) < 0.2)):
        grads = []
        for conv, dtype in ((pyprune.masked_conv2d, x.dtype), (_reference_conv, torch.float64)):
            leaves = [t.to(dtype).requires_grad_() for t in (x, weight)]
            out = conv(*leaves, padding=1, **kwargs)
            (g,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
            grads.append(torch.autograd.grad(g.square().sum(), leaves))
        for got, want in zip(*grads):
            assert want.ne(0).any()
            torch.testing.assert_close(got.double(), want, rtol=1e-5,
                                       atol=1e-5 * want.abs().max().item())


def _reference_conv(x, weight, padding, out_mask=None, weight_mask=None):
    return reference.masked_conv2d(x, weight, None, (1, 1), (padding, padding), (1, 1), 1, None,
                                   out_mask, weight_mask)


def test_soft_mask_gradients(device_backend):
    device, backend = device_backend
    dtype = torch.float64 if torch.float64 in dtypes_for(backend) else torch.float32
    geom = GEOMETRIES[0]
    n, cin, cout = geom[:3]
    x, weight, bias, gen = _inputs(geom, dtype, device)
    for in_shape, out_shape in [((cin,), (cout,)), ((n, cin), (n, cout))]:
        m_in = torch.rand(in_shape, generator=gen).to(dtype).to(device)
        m_out = torch.rand(out_shape, generator=gen).to(dtype).to(device)
        m_w = torch.rand(weight.shape, generator=gen).to(dtype).to(device)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, m_in, m_out, m_w)]
        got = pyprune.masked_conv2d(*leaves[:3], *_conv_args(geom), in_mask=leaves[3],
                                    out_mask=leaves[4], weight_mask=leaves[5])
        grad = torch.randn(got.shape, generator=gen).to(dtype).to(device)
        grads = torch.autograd.grad(got, leaves, grad)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        want = reference.masked_conv2d(*ref[:3], *_conv_args(geom), in_mask=ref[3],
                                       out_mask=ref[4], weight_mask=ref[5])
        for g, w in zip(grads, torch.autograd.grad(want, ref, grad.double())):
            _close(g, w, dtype, scale=8.0)


def test_gradcheck(device_backend):
    device, backend = device_backend
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no float64")
    geom = (2, 3, 4, 5, 4, 3, 1, 1, 1, 1)
    x, weight, bias, gen = _inputs(geom, torch.float64, device)
    for kinds in (("static", "static"), ("sample", "sample")):
        masks = dict(in_mask=_mask(kinds[0], 2, 3, gen, device),
                     out_mask=_mask(kinds[1], 2, 4, gen, device))
        masks["in_mask"][..., 0] = True
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        assert torch.autograd.gradcheck(
            lambda a, b, c: pyprune.masked_conv2d(a, b, c, 1, 1, **masks), leaves)


def test_opcheck(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    fwd, bwd = _OPS[backend]
    geom = GEOMETRIES[0]
    x, weight, bias, gen = _inputs(geom, torch.float32, device)
    for kinds in (("static", "sample"), ("none", "static"), ("sample", "none")):
        im, om = _mask(kinds[0], 3, 5, gen, device), _mask(kinds[1], 3, 7, gen, device)
        args = (x.clone().requires_grad_(), weight.clone().requires_grad_(),
                bias.clone().requires_grad_(), [1, 1], [1, 1], [1, 1], 1, im, om)
        torch.library.opcheck(fwd, args)
        out = fwd(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, im, om)
        torch.library.opcheck(bwd, (torch.randn_like(out), x, weight, [1, 1], [1, 1], [1, 1], 1,
                                    im, om))
    if backend in ("cpu", "cuda"):
        w = weight[[0, 2, 3]][:, [1, 4]].contiguous()
        args = (x.clone().requires_grad_(False), w, bias[[0, 2, 3]], [1, 1], [1, 1], [1, 1],
                torch.tensor([1, 4], device=device), torch.tensor([0, 2, 3], device=device), 7)
        torch.library.opcheck(torch.ops.pyprune._channel_conv.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_conv(layout):
    """The compacted-operand op behind MaskedConv2d's cache, against the reference."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 6, 3, 3), torch.randn(8)
    in_idx, out_idx = torch.tensor([0, 3, 5]), torch.tensor([7, 1, 2])
    in_mask = torch.zeros(6, dtype=torch.bool)
    in_mask[in_idx] = True
    out_mask = torch.zeros(8, dtype=torch.bool)
    out_mask[out_idx] = True
    for i, o in ((in_idx, out_idx), (None, out_idx), (in_idx, None), (None, None)):
        w = weight if o is None else weight[o]
        w = w if i is None else w[:, i]
        b = bias if o is None else bias[o]
        got = torch.ops.pyprune._channel_conv(x, w.contiguous(), b, [2, 1], [1, 1], [1, 1], i, o, 8)
        want = reference.masked_conv2d(x, weight, bias, (2, 1), 1, 1, 1,
                                       in_mask if i is not None else None,
                                       out_mask if o is not None else None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyprune._channel_conv(x, weight[:3], bias[:3], [1, 1], [1, 1], [1, 1], None,
                                        torch.tensor([0, 1, 8]), 8)


class _Net(torch.nn.Module):
    def __init__(self, gate: bool):
        super().__init__()
        self.conv1 = MaskedConv2d(3, 8, 3, padding=1)
        self.conv1.out_mask = torch.tensor([True, False] * 4)
        self.conv2 = MaskedConv2d(8, 8, 3, padding="same", bias=False)
        self.conv2.in_mask = torch.rand(8) < 2.0  # all kept, float values ignored: bool mask
        self.gate = ChannelGate(8, 8, 0.5) if gate else None
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        if self.gate is not None:
            mask, scale = self.gate(x)
            self.conv2.out_mask = None
            x = pyprune.masked_conv2d(x, self.conv2.weight, None, 1, 1, out_mask=mask) * scale[:, :, None, None]
        else:
            x = self.conv2(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("gate", [False, True], ids=["static", "gated"])
def test_compile_fullgraph(device_backend, gate):
    device, backend = device_backend
    torch.manual_seed(0)
    model = _Net(gate).to(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    eager = model(x)
    out = compile_and_backward(model, x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


# (kwargs, error, message)
BAD = [
    (dict(x=torch.randn(3, 5, 9)), ValueError, "x must be 4-D"),
    (dict(x=torch.ones(3, 5, 9, 6, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    (dict(weight=torch.randn(7, 4, 3, 3)), ValueError, "expects 4 input channels, x has 5"),
    (dict(weight=torch.randn(0, 5, 3, 3)), ValueError, "weight must have at least one output channel"),
    (dict(weight=torch.randn(7, 5, 3, 3, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    (dict(bias=torch.randn(6)), ValueError, r"bias must have shape \(7,\)"),
    (dict(in_mask=torch.ones(4, dtype=torch.bool)), ValueError, r"in_mask must have shape \(5,\) or \(3, 5\)"),
    (dict(out_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"out_mask must have shape \(7,\) or \(3, 7\)"),
    (dict(out_mask=torch.ones(7, dtype=torch.int64)), TypeError, "out_mask must be bool"),
    (dict(in_mask=[True] * 5), TypeError, "in_mask must be a torch.Tensor"),
    (dict(weight_mask=torch.ones(7, 5, 3, 1, dtype=torch.bool)), ValueError, "weight_mask must have weight's shape"),
    (dict(groups=2), ValueError, "groups must be >= 1 and divide"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding="full"), ValueError, "padding must be one of"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(dilation=(1, 2, 3)), TypeError, "dilation must be an int or a pair"),
    (dict(x=torch.randn(3, 5, 2, 2), padding=0), ValueError, "smaller than the dilated kernel"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(device_backend, case):
    device, _ = device_backend
    kwargs, error, message = BAD[case]
    args = dict(x=torch.randn(3, 5, 9, 6), weight=torch.randn(7, 5, 3, 3), bias=None, padding=1)
    args.update(kwargs)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=message):
        pyprune.masked_conv2d(**args)


def test_masks_on_another_device():
    if not torch.cuda.is_available():
        x = torch.randn(2, 3, 5, 5)
        mask = torch.ones(4, dtype=torch.bool, device="meta")
        with pytest.raises(ValueError, match="tensors must be on one device"):
            pyprune.masked_conv2d(x, torch.randn(4, 3, 3, 3), out_mask=mask)
    else:
        x = torch.randn(2, 3, 5, 5, device="cuda")
        with pytest.raises(ValueError, match="tensors must be on one device"):
            pyprune.masked_conv2d(x, torch.randn(4, 3, 3, 3, device="cuda"),
                                  out_mask=torch.ones(4, dtype=torch.bool))


def test_empty_batch(device_backend):
    device, _ = device_backend
    x = torch.randn(0, 5, 9, 6, device=device)
    w = torch.randn(7, 5, 3, 3, device=device)
    y = pyprune.masked_conv2d(x, w, padding=1, out_mask=torch.ones(0, 7, dtype=torch.bool,
                                                                  device=device))
    assert y.shape == (0, 7, 9, 6)


# Each path of a convolution without input channels, which once read out of bounds (SIGSEGV):
# run apart so that a crash fails the test instead of ending the session.
_NO_INPUT_CHANNELS = """
import os, torch, pyprune
from pyprune.nn import MaskedConv2d
x, w, b = torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3), torch.randn(6)
keep = torch.tensor([True, False, True, True, False, True])
per_sample = torch.stack([keep, ~keep])
for mask in (keep, per_sample):
    want = torch.where(mask.view(-1, 6, 1, 1), b.view(1, -1, 1, 1), 0.0).expand(2, 6, 5, 5)
    for backend in pyprune.backends("cpu"):
        with pyprune.use_backend(backend):
            assert torch.equal(pyprune.masked_conv2d(x, w, b, padding=1, out_mask=mask), want)
    for path in ("per_sample", "dense"):
        os.environ["PYPRUNE_MASKED_CONV_CPU"] = path
        for groups in (1, 2):
            got = torch.ops.pyprune.masked_conv2d(x, torch.randn(6, 0, 3, 3), b, [1, 1], [1, 1],
                                                  [1, 1], groups, None, mask)
            assert torch.equal(got, want)
            gx, gw, gb = torch.ops.pyprune._masked_conv2d_backward(
                torch.ones(2, 6, 5, 5), x, w, [1, 1], [1, 1], [1, 1], groups, None, mask)
            assert gx.shape == x.shape and gw.shape == w.shape
            assert torch.equal(gb, 25.0 * mask.expand(2, 6).sum(0))
kept = keep.nonzero().view(-1)
got = torch.ops.pyprune._channel_conv(x, w[kept], b[kept], [1, 1], [1, 1], [1, 1], None, kept, 6)
assert torch.equal(got, torch.where(keep.view(1, 6, 1, 1), b.view(1, 6, 1, 1), 0.0).expand(2, 6, 5, 5))
m = MaskedConv2d(4, 6, 3, padding=1).eval()
m.in_mask, m.out_mask = torch.zeros(4, dtype=torch.bool), keep
with torch.no_grad():
    got = m(torch.randn(2, 4, 5, 5))
assert torch.equal(got, torch.where(keep.view(1, 6, 1, 1), m.bias.view(1, 6, 1, 1), 0.0).expand(2, 6, 5, 5))
"""


def test_no_input_channels_does_not_crash():
    done = subprocess.run([sys.executable, "-c", _NO_INPUT_CHANNELS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _channel_mask(kind: str, n: int, c: int, device) -> torch.Tensor | None:
    shape = (n, c) if kind.endswith("sample") else (c,)
    if kind.startswith("bool"):
        return (torch.arange(n * c if kind.endswith("sample") else c) % 3 != 1).view(shape).to(device)
    if kind.startswith("soft"):
        return torch.rand(shape, device=device, requires_grad=True)
    return None


EMPTY_MASKS = ["none", "bool", "bool_sample", "soft", "soft_sample"]


@pytest.mark.parametrize("in_kind,out_kind,weight_kind", [
    (i, o, "none") for i in EMPTY_MASKS for o in EMPTY_MASKS] + [
    ("none", "bool", "bool"), ("none", "none", "bool"), ("none", "soft", "soft")])
@pytest.mark.parametrize("n,c_in,groups", [(2, 0, 1), (3, 0, 2), (0, 4, 1)],
                         ids=["no_input_channels", "no_input_channels_groups", "empty_batch"])
def test_empty_inputs(device_backend, n, c_in, groups, in_kind, out_kind, weight_kind):
    """Empty inputs give what the convolution means: without input channels the bias at every
    position through the out_mask (F.conv2d itself returns no channels there), with an empty
    batch an empty output; gradients of every input have its shape and the reference's values."""
    device, backend = device_backend
    torch.manual_seed(0)
    c_out = 6
    x = torch.randn(n, c_in, 5, 4, device=device, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(c_out, device=device, requires_grad=True)
    in_mask = _channel_mask(in_kind, n, c_in, device)
    out_mask = _channel_mask(out_kind, n, c_out, device)
    weight_mask = {"none": None, "bool": torch.rand(weight.shape, device=device) < 0.5,
                   "soft": torch.rand(weight.shape, device=device, requires_grad=True)}[weight_kind]
    y = pyprune.masked_conv2d(x, weight, bias, padding=1, groups=groups, in_mask=in_mask,
                              out_mask=out_mask, weight_mask=weight_mask)
    if c_in == 0:
        want = bias.view(1, -1, 1, 1).expand(n, c_out, 5, 4)
        if out_mask is not None:
            m = out_mask.view(-1, c_out, 1, 1)
            want = torch.where(m, want, 0.0) if m.dtype == torch.bool else want * m
    else:
        want = reference.masked_conv2d(x, weight, bias, 1, 1, 1, groups, in_mask, out_mask,
                                       weight_mask)
    assert y.shape == want.shape
    assert torch.equal(y, want)
    inputs = [t for t in (x, weight, bias, in_mask, out_mask, weight_mask)
              if t is not None and t.requires_grad]
    grad = torch.randn(y.shape, device=device)
    got = torch.autograd.grad(y, inputs, grad, allow_unused=True, materialize_grads=True)
    wanted = torch.autograd.grad(want, inputs, grad, allow_unused=True, materialize_grads=True)
    for g, w, t in zip(got, wanted, inputs):
        assert g.shape == t.shape
        torch.testing.assert_close(g, w)


def _per_sample_gated(weight, projection):
    def f(x):
        out_mask = x.mean((2, 3)) @ projection > 0
        return pyprune.masked_conv2d(x, weight, padding=1, out_mask=out_mask)

    return f


def test_compile_dynamic_per_sample_mask(device_backend):
    """A per-sample mask computed from x, under compile(dynamic=True): one graph for every batch
    size of at least 2 (batch 1 is torch's own 0/1 specialization), one graph in all where the
    batch is unbacked; the shape checks hold symbolically."""
    device, _ = device_backend
    torch.manual_seed(0)
    f = _per_sample_gated(torch.randn(8, 4, 3, 3, device=device), torch.randn(4, 8, device=device))
    for unbacked in (False, True):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
        for n in (2, 3, 1, 5):
            x = torch.randn(n, 4, 6, 6, device=device)
            if unbacked:
                torch._dynamo.decorators.mark_unbacked(x, 0)
            torch.testing.assert_close(compiled(x), f(x))
        assert counter.frame_count == (1 if unbacked else 2)


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gate":
        return _Gated()
    m = MaskedConv2d(6, 8, 3, padding=1)
    if kind in ("in", "both"):
        m.in_mask = torch.arange(6) % 3 != 1
    if kind in ("out", "both"):
        m.out_mask = torch.arange(8) % 3 != 2
    if kind == "soft":
        m.in_mask, m.out_mask = torch.rand(6), torch.rand(8)
    if kind == "weight_bool":
        m.weight_mask = torch.rand(8, 6, 3, 3) < 0.3
    if kind == "weight_soft":
        m.weight_mask = torch.rand(8, 6, 3, 3)
    return m


class _Gated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = ChannelGate(6, 8, 0.5)
        self.conv = torch.nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x):
        mask, scale = self.gate(x)
        y = pyprune.masked_conv2d(x, self.conv.weight, self.conv.bias, padding=1, out_mask=mask)
        return y * scale[:, :, None, None]


def _compile_counts(model, dynamic, device, grad) -> list[int]:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    counts = []
    # Small images: the Triton interpreter runs these.
    for shape in ((2, 6, 12, 12), (2, 6, 10, 10), (3, 6, 10, 10), (1, 6, 10, 10), (5, 6, 10, 10)):
        x = torch.randn(shape, device=device, requires_grad=grad)
        y = compiled(x)
        torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)
        if grad:
            y.sum().backward()
        counts.append(counter.frame_count)
    return counts


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("kind", ["none", "in", "out", "both", "soft", "weight_bool",
                                  "weight_soft", "gate"])
def test_compile_modules_dynamic_shapes(device_backend, kind, dynamic):
    """Every module compiles (fullgraph, forward and backward) once per graph that nn.Conv2d
    needs under the same dynamic-shape policy: new spatial sizes and batch sizes recompile only
    where torch turns a dim dynamic or specializes batch 1."""
    device, backend = device_backend
    if backend == "triton" and kind not in ("both", "gate"):
        pytest.skip("the interpreter is slow: the bool-mask kernels and the gate")
    model = _module(kind).to(device)
    baseline = _compile_counts(torch.nn.Conv2d(6, 8, 3, padding=1).to(device), dynamic, device,
                               True)
    assert _compile_counts(model, dynamic, device, True) == baseline
    with torch.no_grad():
        model.eval()
        assert _compile_counts(model, dynamic, device, False) == baseline


# ---------------------------------------------------------------- MaskedConv2d, ChannelGate


@pytest.mark.parametrize("conv_args", [
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, bias=True),
    dict(in_channels=6, out_channels=9, kernel_size=(3, 2), padding="same", dilation=2, bias=False),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=3),
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect"),
], ids=["stride", "same", "groups", "reflect"])
def test_module_from_conv(conv_args):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(**conv_args)
    m = MaskedConv2d.from_conv(conv)
    assert m.weight is conv.weight and m.bias is conv.bias
    x = torch.randn(3, 6, 9, 7)
    torch.testing.assert_close(m(x), conv(x))
    cout = conv.out_channels
    out_mask = torch.arange(cout) % 3 != 1
    in_mask = torch.tensor([True, False, True, True, False, True])
    m.set_masks(in_mask=in_mask, out_mask=out_mask)
    want = conv(x * in_mask.view(1, -1, 1, 1)) * out_mask.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the cached path
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    # state_dict round trip into a fresh module
    fresh = MaskedConv2d(**conv_args)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.out_mask, out_mask) and torch.equal(fresh.in_mask, in_mask)
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)


def test_module_sees_parameter_and_mask_changes():
    """The inference path of static bool channel masks reads the weight, bias and masks anew on
    each call: in-place, .data, vector_to_parameters and dtype changes are all seen."""
    torch.manual_seed(0)
    m = MaskedConv2d(4, 6, 3, padding=1).eval()
    m.out_mask = torch.tensor([True, False, True, True, False, True])
    m.in_mask = torch.tensor([True, True, False, True])
    x = torch.randn(2, 4, 5, 5)

    def check():
        want = reference.masked_conv2d(x.to(m.weight.dtype), m.weight, m.bias, 1, 1,
                                       in_mask=m.in_mask, out_mask=m.out_mask)
        torch.testing.assert_close(m(x.to(m.weight.dtype)), want)

    with torch.no_grad():
        check()
        m.weight.mul_(2)
        check()
        m.weight.data.mul_(2)  # bypasses the version counter
        check()
        m.weight.data = torch.randn(6, 4, 3, 3) * 10
        check()
        m.bias.data = torch.randn(6)
        check()
        torch.nn.utils.vector_to_parameters(torch.randn(6 * 4 * 9 + 6) * 10, m.parameters())
        check()
        m.out_mask[1] = True
        check()
        m.out_mask.data[0] = False
        check()
        m.in_mask.data = torch.tensor([False, True, True, True])
        check()
        m.out_mask = torch.tensor([False] * 6)  # nothing kept
        assert torch.equal(m(x), torch.zeros(2, 6, 5, 5))
        m.out_mask = torch.tensor([True, False, True, True, False, True])
        m.double()
        check()


def test_module_cached_path_bad_input():
    m = MaskedConv2d(4, 6, 3, padding=1)
    m.out_mask = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        with pytest.raises(ValueError, match="x must have 4 channels"):
            m(torch.randn(2, 5, 5, 5))
        with pytest.raises(TypeError, match="x must have the weight's dtype"):
            m(torch.randn(2, 4, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="x must be 4-D"):
            m(torch.randn(4, 5, 5))


def test_module_training_gets_gradients():
    m = MaskedConv2d(4, 6, 3, padding=1)
    m.out_mask = torch.tensor([True, False, True, True, False, True])
    m(torch.randn(2, 4, 5, 5)).sum().backward()
    assert m.weight.grad is not None
    assert (m.weight.grad[1] == 0).all() and (m.weight.grad[0] != 0).any()
    assert m.bias.grad[1] == 0


def test_channel_gate():
    torch.manual_seed(0)
    gate = ChannelGate(6, 10, keep_ratio=0.3)
    x = torch.randn(4, 6, 5, 5)
    mask, scale = gate(x)
    assert mask.shape == (4, 10) and mask.dtype == torch.bool
    saliency = F.relu(gate.fc(x.abs().mean((2, 3))))
    kth = saliency.topk(3, dim=1).values[:, -1:]
    assert torch.equal(mask, (saliency >= kth) & (saliency != 0))
    assert torch.equal(scale, torch.where(mask, saliency, torch.zeros(())))
    scale.sum().backward()
    assert gate.fc.weight.grad is not None
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        ChannelGate(6, 10, keep_ratio=0.0)
    with pytest.raises(ValueError, match="x must have 6 channels"):
        gate(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_bool_weight_mask_is_exact(dtype):
    """The bitwise weight masking (no autograd) equals torch.where, inf and NaN included."""
    from pyprune.ops.masked_conv import _keep

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(5, 4, 3, 3, generator=gen).to(dtype)
    t[0, 0, 0, 0], t[1, 0, 0, 0] = float("inf"), float("nan")
    m = torch.rand(5, 4, 3, 3, generator=gen) < 0.5
    m[0, 0, 0, 0] = m[1, 0, 0, 0] = False
    want = torch.where(m, t, torch.zeros((), dtype=dtype))
    assert torch.equal(_keep(t, m), want)
    with torch.enable_grad():  # the autograd path
        assert torch.equal(_keep(t.clone().requires_grad_(), m).detach(), want)


def _captured(call, warm_up: bool = True) -> torch.Tensor:
    """call()'s result from a captured CUDA graph, replayed once; with warm_up, call runs first
    on a side stream outside the capture."""
    if warm_up:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    """Static and per-sample masks inside a captured CUDA graph: no host synchronisation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 9, 9, generator=gen).cuda()
    w, b = torch.randn(6, 8, 3, 3, generator=gen).cuda(), torch.randn(6, generator=gen).cuda()
    for in_mask, out_mask in [(torch.rand(8, generator=gen) < 0.5, torch.rand(6, generator=gen) < 0.5),
                              (None, torch.rand(4, 6, generator=gen) < 0.5)]:
        in_mask = None if in_mask is None else in_mask.cuda()
        out_mask = out_mask.cuda()
        with pyprune.use_backend(backend):
            out = _captured(lambda: pyprune.masked_conv2d(x, w, b, 1, 1, in_mask=in_mask,
                                                          out_mask=out_mask))
        want = reference.masked_conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 1,
                                       in_mask, out_mask)
        _close(out, want, torch.float32, scale=4.0)


@pytest.mark.gpu
@pytest.mark.tf32
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_tf32_default(backend, per_sample):
    """With PyTorch's default (cuDNN TF32 for float32 convolutions) results meet TF32
    tolerances, scaled by the square root of the reduction length."""
    assert torch.backends.cudnn.allow_tf32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 9, 9, generator=gen).cuda()
    w, b = torch.randn(24, 16, 3, 3, generator=gen).cuda(), torch.randn(24, generator=gen).cuda()
    lead = (4,) if per_sample else ()
    in_mask = (torch.rand(*lead, 16, generator=gen) < 0.5).cuda()
    out_mask = (torch.rand(*lead, 24, generator=gen) < 0.5).cuda()
    with pyprune.use_backend(backend):
        got = pyprune.masked_conv2d(x, w, b, 1, 1, in_mask=in_mask, out_mask=out_mask)
    want = reference.masked_conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 1, in_mask, out_mask)
    scale = (16 * 9) ** 0.5
    torch.testing.assert_close(got.double(), want, atol=TF32_TOLERANCE[0] * scale,
                               rtol=TF32_TOLERANCE[1] * scale)


def test_dilated_1x1_kernel(device_backend):
    """Dilation along a kernel dimension of size 1 changes nothing (pyprune normalizes it; a
    dilated 1x1 kernel on grouped channels_last input crashes torch 2.13's CPU convolution)."""
    device, _ = device_backend
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 1, generator=gen).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 2, 1, 1, generator=gen).to(device)
    bias = torch.randn(4, generator=gen).to(device)
    scale = torch.rand(4, generator=gen).to(device)
    got = pyprune.masked_conv2d(x, weight, bias, 2, 1, 2, 2, out_mask=scale)
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), 2, 1, 1, 2,
                                   out_mask=scale.double())
    assert got.shape == (1, 4, 4, 2)
    _close(got, want, torch.float32)


def _spy_soft_mask_op(monkeypatch, backend: str) -> list:
    """Records (in_mask dtype, out_mask dtype, raw) of each call of the backend's soft-mask op
    (None for an absent mask), through its entry point."""
    from pyprune.ops import masked_conv as ops

    seen = []
    real = ops._SCALED_CALL[backend]

    def spy(x, weight, bias, stride, padding, dilation, in_mask, out_mask, raw):
        seen.append((None if in_mask is None else in_mask.dtype,
                     None if out_mask is None else out_mask.dtype, raw))
        return real(x, weight, bias, stride, padding, dilation, in_mask, out_mask, raw)

    monkeypatch.setitem(ops._SCALED_CALL, backend, spy)
    return seen


def test_kernels_apply_soft_input_masks(device_backend, monkeypatch):
    """On the cuda and triton backends a per-sample float in_mask goes into the kernel (no
    scaled copy of x), and its gradient and x's match the reference."""
    device, backend = device_backend
    if backend not in ("cuda", "triton"):
        pytest.skip("the CUDA and Triton kernels' soft input masks")
    seen = _spy_soft_mask_op(monkeypatch, backend)
    geom = GEOMETRIES[1]
    n, cin, cout = geom[:3]
    x, weight, bias, gen = _inputs(geom, torch.float32, device)
    scale = torch.rand(n, cin, generator=gen).to(device)
    scale[0, 1] = 0.0
    out_mask = _mask("sample", n, cout, gen, device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, scale)]
    got = pyprune.masked_conv2d(*leaves[:3], *_conv_args(geom), in_mask=leaves[3],
                                out_mask=out_mask)
    assert seen[0][0] == torch.float32  # the in_mask reached the kernel
    grad = torch.randn(got.shape, generator=gen).to(device)
    grads = torch.autograd.grad(got, leaves, grad)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = reference.masked_conv2d(*ref[:3], *_conv_args(geom), in_mask=ref[3],
                                   out_mask=out_mask)
    _close(got, want.detach(), torch.float32, scale=4.0)
    for g, w in zip(grads, torch.autograd.grad(want, ref, grad.double())):
        _close(g, w, torch.float32, scale=8.0)


@pytest.mark.parametrize("in_kind", ["none", "bool", "soft"])
def test_kernels_apply_soft_output_masks(device_backend, monkeypatch, in_kind):
    """On the cuda and triton backends a per-sample float out_mask scales the output in the
    kernel's epilogue (pyprune::_masked_conv2d_scaled*), which stores the unscaled output too
    only when the mask's gradient is wanted; values (float32, float16, bfloat16) and the
    gradients of x, weight, bias and both masks match the reference."""
    device, backend = device_backend
    if backend not in ("cuda", "triton"):
        pytest.skip("the CUDA and Triton kernels' soft output masks")
    seen = _spy_soft_mask_op(monkeypatch, backend)
    for geom in (GEOMETRIES[0], GEOMETRIES[1]):
        n, cin, cout = geom[:3]
        x, weight, bias, gen = _inputs(geom, torch.float32, device)
        scale = torch.rand(n, cout, generator=gen).to(device)
        scale[0, 1] = 0.0  # a zero scale still gets its gradient
        in_mask = {"none": None, "bool": _mask("sample", n, cin, gen, device),
                   "soft": torch.rand(n, cin, generator=gen).to(device)}[in_kind]
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, scale)]
        if in_kind == "soft":
            leaves.append(in_mask.clone().requires_grad_())
        seen.clear()
        got = pyprune.masked_conv2d(*leaves[:3], *_conv_args(geom), out_mask=leaves[3],
                                    in_mask=leaves[4] if in_kind == "soft" else in_mask)
        assert [(out, raw) for _, out, raw in seen] == [(torch.float32, True)]
        grad = torch.randn(got.shape, generator=gen).to(device)
        grads = torch.autograd.grad(got, leaves, grad)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        want = reference.masked_conv2d(*ref[:3], *_conv_args(geom), out_mask=ref[3],
                                       in_mask=ref[4] if in_kind == "soft" else in_mask)
        _close(got, want.detach(), torch.float32, scale=4.0)
        for g, w in zip(grads, torch.autograd.grad(want, ref, grad.double())):
            _close(g, w, torch.float32, scale=8.0)
        for dtype in (torch.float16, torch.bfloat16):
            seen.clear()
            m = None if in_mask is None else in_mask.to(in_mask.dtype if in_kind == "bool" else dtype)
            with torch.no_grad():
                got = pyprune.masked_conv2d(x.to(dtype), weight.to(dtype), bias.to(dtype),
                                            *_conv_args(geom), in_mask=m, out_mask=scale.to(dtype))
            # no unscaled output without autograd
            assert [(out, raw) for _, out, raw in seen] == [(dtype, False)]
            want = reference.masked_conv2d(x.to(dtype).double(), weight.to(dtype).double(),
                                           bias.to(dtype).double(), *_conv_args(geom),
                                           in_mask=None if m is None else (m if m.dtype == torch.bool else m.double()),
                                           out_mask=scale.to(dtype).double())
            _close(got, want, dtype, scale=4.0)


def test_soft_mask_op(device_backend):
    """opcheck of the soft-mask op (cuda, triton) with and without the unscaled output, for
    (N, C) and (C,) masks, soft or bool on either side; compile(fullgraph=True) of a model
    that learns the mask."""
    device, backend = device_backend
    if backend not in ("cuda", "triton"):
        pytest.skip("the CUDA and Triton kernels' soft masks")
    from pyprune.ops.masked_conv import _SCALED_OPS

    op = _SCALED_OPS[backend]
    geom = GEOMETRIES[0]
    n, cin, cout = geom[:3]
    x, weight, bias, gen = _inputs(geom, torch.float32, device)
    for shape in ((n, cout), (cout,)):
        for raw in (True, False):
            om = torch.rand(shape, generator=gen).to(device).requires_grad_(raw)
            for im in (_mask("sample", n, cin, gen, device),
                       torch.rand(shape[:-1] + (cin,), generator=gen).to(device).requires_grad_()):
                args = (x.clone().requires_grad_(), weight.clone().requires_grad_(),
                        bias.clone().requires_grad_(), [1, 1], [1, 1], [1, 1], im, om, raw)
                torch.library.opcheck(op, args)
    im = torch.rand(n, cin, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(op, (x.clone().requires_grad_(), weight, bias, [2, 2], [1, 1], [1, 1],
                               im, _mask("static", n, cout, gen, device), False))
    # The bool-mask op takes no soft mask (the autograd above is where those get gradients).
    fwd = _OPS[backend][0]
    with pytest.raises((TypeError, RuntimeError), match="must be bool"):
        fwd(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, im.detach(), None)

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)

        def forward(self, inp, gate):
            return pyprune.masked_conv2d(inp, self.conv.weight, self.conv.bias, padding=1,
                                         out_mask=torch.sigmoid(gate))

    model = Gated().to(device)
    gate = torch.randn(n, cout, generator=gen).to(device).requires_grad_()
    eager = model(x, gate)
    (g_eager,) = torch.autograd.grad(eager.sum(), gate)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x, gate)
    (g_got,) = torch.autograd.grad(got.sum(), gate)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got, g_eager, atol=1e-4, rtol=1e-4)


def test_output_layout_of_ambiguous_strides(device_backend):
    """x whose strides are both contiguous and channels_last-like (one channel, permuted): the
    output and x's gradient take the layout F.conv2d gives, on every path, soft masks
    included, and the values match the reference."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 1, generator=gen).permute(0, 3, 1, 2).to(device)
    weight = torch.randn(4, 1, 3, 3, generator=gen).to(device)
    eager = x.clone().requires_grad_()
    out = F.conv2d(eager, weight, padding=1)
    out.sum().backward()
    want_stride, want_grad_stride = out.stride(), eager.grad.stride()
    masks = [{}, {"out_mask": _mask("sample", 2, 4, gen, device)},
             {"out_mask": torch.rand(2, 4, generator=gen).to(device).requires_grad_()},
             {"in_mask": torch.rand(2, 1, generator=gen).to(device)}]
    for m in masks:
        leaf = x.clone().requires_grad_()
        assert leaf.stride() == x.stride()
        got = pyprune.masked_conv2d(leaf, weight, padding=1, **m)
        assert got.stride() == want_stride, m
        _close(got, reference.masked_conv2d(x.double(), weight.double(), padding=1,
                                            **{k: v.detach() if v.dtype == torch.bool else
                                               v.detach().double() for k, v in m.items()}),
               torch.float32, scale=4.0)
        got.sum().backward()
        assert leaf.grad.stride() == want_grad_stride, m


# CUDA tensor-core paths (csrc/cuda/masked_conv.cu), bf16 / fp16 and float32 under TF32:
# masked_conv2d_tc_packed_kernel after pack_kernel (per-sample masks without a per-sample bool
# in_mask; static masks with a short reduction), masked_conv2d_tc_kernel (per-sample bool
# in_masks), scatter_kept_channels_kernel after cuDNN for the other static output masks.
# (N, C_in, C_out, H, W, kernel, stride, padding, dilation): pixels and channels that are not
# multiples of 16 or of the 64-wide tiles, N = 1, more input channels than one 256-channel chunk,
# a kernel with more positions (81) than a K step (64), stride, dilation.
TC_GEOMETRIES = [
    (3, 20, 37, 9, 7, 3, 1, 1, 1),
    (1, 16, 64, 8, 8, 3, 1, 1, 1),
    (2, 300, 70, 5, 6, 3, 1, 1, 1),
    (2, 9, 17, 13, 11, 3, 2, 1, 2),
    (2, 5, 19, 12, 12, 9, 1, 4, 1),
    (4, 33, 130, 4, 4, 1, 1, 0, 1),
]


def _tc_inputs(geom, dtype, gen, channels_last):
    n, cin, cout, h, w, k, *_ = geom
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype).cuda()
    weight = (torch.randn(cout, cin, k, k, generator=gen) / (k * cin ** 0.5)).to(dtype).cuda()
    bias = torch.randn(cout, generator=gen).to(dtype).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias


def _tc_masks(n, cin, cout, gen):
    """Per-sample masks at about half; where N > 1, sample 0 with no output channel kept and the
    last sample with no input channel kept."""
    in_mask = torch.rand(n, cin, generator=gen) < 0.5
    out_mask = torch.rand(n, cout, generator=gen) < 0.5
    if n > 1:
        out_mask[0] = False
        in_mask[-1] = False
    return in_mask.cuda(), out_mask.cuda()


def _low_precision_close(got, x, weight, bias, geom, in_mask, out_mask):
    """got's error against the float64 reference is at most twice that of eager PyTorch (cuDNN)
    in the same dtype, plus the dtype's absolute tolerance; masked output channels are exactly
    0."""
    *_, stride, padding, dilation = geom
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), stride, padding,
                                   dilation, 1, in_mask, out_mask)
    keep_in = in_mask.to(x.dtype)[:, :, None, None]
    keep_out = out_mask.to(x.dtype)[:, :, None, None]
    eager = F.conv2d(x * keep_in, weight, bias, stride, padding, dilation) * keep_out
    err = (got.double() - want).abs().max().item()
    eager_err = (eager.double() - want).abs().max().item()
    assert err <= 2 * eager_err + TOLERANCES[x.dtype][0], (err, eager_err)
    assert torch.equal(got.masked_fill(out_mask[:, :, None, None], 0), torch.zeros_like(got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom", TC_GEOMETRIES)
def test_cuda_tensor_cores_per_sample(dtype, channels_last, geom):
    """The wmma kernel in bf16 / fp16 on tails of every tile dimension, empty samples, stride,
    dilation, both layouts: within twice eager's low-precision error, exact zeros."""
    gen = torch.Generator().manual_seed(11)
    n, cin, cout, *_ = geom
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    in_mask, out_mask = _tc_masks(n, cin, cout, gen)
    *_, stride, padding, dilation = geom
    with pyprune.use_backend("cuda"):
        got = pyprune.masked_conv2d(x, weight, bias, stride, padding, dilation,
                                    in_mask=in_mask, out_mask=out_mask)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    _low_precision_close(got, x, weight, bias, geom, in_mask, out_mask)
    if n > 1:  # no input channel kept: the bias alone in the kept output channels
        last = bias[None, :, None, None].expand_as(got[-1:]) * out_mask[-1][None, :, None, None]
        assert torch.equal(got[-1:], last.to(dtype))


def _per_sample_out_close(got, x, weight, bias, geom, out_mask):
    """got against the float64 reference for an (N, C_out) out_mask alone: TF32 tolerances for
    float32 (scaled by the square root of the reduction length) with the masked channels
    exactly 0, twice eager's error for 16-bit dtypes."""
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    if x.dtype == torch.float32:
        want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), stride,
                                       padding, dilation, 1, None, out_mask)
        scale = (cin * k * k) ** 0.5
        torch.testing.assert_close(got.double(), want, atol=TF32_TOLERANCE[0] * scale,
                                   rtol=TF32_TOLERANCE[1] * scale)
        assert torch.equal(got.masked_fill(out_mask[:, :, None, None], 0), torch.zeros_like(got))
    else:
        in_mask = torch.ones(n, cin, dtype=torch.bool, device=x.device)
        _low_precision_close(got, x, weight, bias, geom, in_mask, out_mask)


@pytest.mark.gpu
@pytest.mark.tf32  # float32 on the tensor cores (TF32), as PyTorch's default has it
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom", TC_GEOMETRIES)
def test_cuda_packed_per_sample(dtype, channels_last, geom):
    """A per-sample out_mask without an in_mask takes the packed path (pack_kernel, then
    masked_conv2d_tc_packed_kernel: input channels padded to 32, padding and strides of x laid
    out by the pack, 9 x 9 kernels, stride, dilation, tails of every tile): within twice eager's
    low-precision error (TF32 tolerances for float32), exact zeros in the masked channels."""
    gen = torch.Generator().manual_seed(13)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    _, out_mask = _tc_masks(n, cin, cout, gen)
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(lambda: pyprune.masked_conv2d(
            x, weight, bias, stride, padding, dilation, out_mask=out_mask))
    assert _launched(names, "pack_kernel") and _launched(names, "tc_packed_kernel"), names
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    _per_sample_out_close(got, x, weight, bias, geom, out_mask)


@pytest.mark.gpu
@pytest.mark.tf32
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("geom", TC_GEOMETRIES[:4])
def test_cuda_per_sample_tf32_flag(geom):
    """float32 per-sample masks follow torch.backends.cudnn.allow_tf32: TF32 tensor cores within
    TF32 tolerances when allowed (PyTorch's default), the full-precision FMA kernel within
    float32 tolerances when not; the two differ, so the flag reaches the kernel choice."""
    assert torch.backends.cudnn.allow_tf32
    gen = torch.Generator().manual_seed(12)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, torch.float32, gen, False)
    # Not _tc_masks: its first and last samples keep no output / no input channel, which gives
    # the same (bias or zero) output either way and leaves nothing to tell the kernels apart
    # where N = 2. Every sample keeps about half of both, and at least one of each.
    in_mask = torch.rand(n, cin, generator=gen) < 0.5
    out_mask = torch.rand(n, cout, generator=gen) < 0.5
    in_mask[:, 0] = out_mask[:, 0] = True
    in_mask, out_mask = in_mask.cuda(), out_mask.cuda()
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), stride, padding,
                                   dilation, 1, in_mask, out_mask)
    args = (x, weight, bias, stride, padding, dilation)
    with pyprune.use_backend("cuda"):
        tf32 = pyprune.masked_conv2d(*args, in_mask=in_mask, out_mask=out_mask)
        torch.backends.cudnn.allow_tf32 = False
        try:
            full = pyprune.masked_conv2d(*args, in_mask=in_mask, out_mask=out_mask)
        finally:
            torch.backends.cudnn.allow_tf32 = True
    scale = (cin * k * k) ** 0.5
    torch.testing.assert_close(tf32.double(), want, atol=TF32_TOLERANCE[0] * scale,
                               rtol=TF32_TOLERANCE[1] * scale)
    _close(full, want, torch.float32, scale=scale)
    assert not torch.equal(tf32, full)


def _cuda_kernel_names(fn):
    """fn()'s result and the names of the CUDA kernels it launched (after one warm-up call, so
    the static masks' kept indices are cached)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return out, names


def _launched(names, kernel):
    return any(kernel in name for name in names)


def _static_close(got, x, weight, bias, geom, in_mask, out_mask):
    """got against the float64 reference for (C,) masks: 16-bit dtypes within twice eager's
    error (_low_precision_close on the masks expanded over the batch), float32 within TF32
    tolerances where TF32 is allowed (scaled by the square root of the reduction length), else
    float32 tolerances; masked output channels exactly 0."""
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    if x.dtype in (torch.float16, torch.bfloat16):
        b = bias if bias is not None else torch.zeros(cout, dtype=x.dtype, device=x.device)
        in_n = (in_mask if in_mask is not None else torch.ones(cin, dtype=torch.bool,
                                                                 device=x.device)).expand(n, -1)
        out_n = (out_mask if out_mask is not None else torch.ones(cout, dtype=torch.bool,
                                                                    device=x.device)).expand(n, -1)
        _low_precision_close(got, x, weight, b, geom, in_n, out_n)
        return
    want = reference.masked_conv2d(x.double(), weight.double(),
                                   None if bias is None else bias.double(), stride, padding,
                                   dilation, 1, in_mask, out_mask)
    scale = (cin * k * k) ** 0.5
    if torch.backends.cudnn.allow_tf32:
        torch.testing.assert_close(got.double(), want, atol=TF32_TOLERANCE[0] * scale,
                                   rtol=TF32_TOLERANCE[1] * scale)
    else:
        _close(got, want, torch.float32, scale=scale)
    if out_mask is not None:
        assert torch.equal(got[:, ~out_mask], torch.zeros_like(got[:, ~out_mask]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_static", [False, True])
def test_cuda_static_out_mask_scatter(dtype, channels_last, with_bias, in_static):
    """Static output masks on cuDNN with the fused scatter: kept channels with their bias,
    masked ones exactly 0, in both layouts, with and without a static in_mask, an output
    channel count above one block (300) and a 5x7 image (pixels not a multiple of 32). 600 input
    channels (~540 kept at 90%): 153-171 K steps of 32 for one round of CTAs, past the packed
    path's limit for static masks (144), so bf16 takes cuDNN too (float32 does with TF32 off,
    these tests' setting)."""
    gen = torch.Generator().manual_seed(13)
    geom = (3, 600, 300, 5, 7, 3, 1, 1, 1)
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    bias = bias if with_bias else None
    out_mask = (torch.rand(300, generator=gen) < 0.3).cuda()
    in_mask = (torch.rand(600, generator=gen) < 0.9).cuda() if in_static else None
    assert in_mask is None or int(in_mask.sum()) > 512  # 17 steps of 32 a tap at least
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(lambda: pyprune.masked_conv2d(
            x, weight, bias, 1, 1, in_mask=in_mask, out_mask=out_mask))
    assert _launched(names, "scatter_kept_channels_kernel"), names
    assert not _launched(names, "masked_conv2d_tc_kernel"), names
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    _static_close(got, x, weight, bias, geom, in_mask, out_mask)


# Static masks on the tensor-core kernel: short reductions and few CTAs (N, C_in, C_out, H, W,
# kernel, stride, padding, dilation); pixels not a multiple of the 32-pixel tile, stride,
# dilation, a 1x1 kernel, more than 64 kept output channels.
STATIC_TC_GEOMETRIES = [
    (3, 24, 40, 9, 7, 3, 1, 1, 1),
    (2, 16, 130, 5, 7, 3, 1, 1, 1),
    (2, 9, 17, 13, 11, 3, 2, 1, 2),
    (4, 33, 70, 4, 4, 1, 1, 0, 1),
]


def _static_masks(kind, cin, cout, gen):
    """(C,) masks: out25 / out75 keep about a quarter / three quarters of the output channels,
    in the input channels at half, both an in_mask and an out_mask at half."""
    keep_out = {"out25": 0.25, "out75": 0.75, "in": None, "both": 0.5}[kind]
    out_mask = None if keep_out is None else torch.rand(cout, generator=gen) < keep_out
    in_mask = torch.rand(cin, generator=gen) < 0.5 if kind in ("in", "both") else None
    if out_mask is not None:
        out_mask[0] = True  # something kept
    return (None if in_mask is None else in_mask.cuda(),
            None if out_mask is None else out_mask.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kind", ["out25", "out75", "in", "both"])
@pytest.mark.parametrize("geom", STATIC_TC_GEOMETRIES)
def test_cuda_static_masks_tensor_cores(dtype, channels_last, with_bias, kind, geom):
    """Static (C,) masks with a short reduction run the packed path (pack_kernel, a bool
    in_mask's kept channels listed first, then masked_conv2d_tc_packed_kernel; no cuDNN, no
    scatter, no gathering kernel), at small and large keep, on the input side, on both: within
    twice eager's low-precision error, masked output channels exactly 0, the layout of x."""
    gen = torch.Generator().manual_seed(14)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    bias = bias if with_bias else None
    in_mask, out_mask = _static_masks(kind, cin, cout, gen)
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(lambda: pyprune.masked_conv2d(
            x, weight, bias, stride, padding, dilation, in_mask=in_mask, out_mask=out_mask))
    assert _launched(names, "pack_kernel") and _launched(names, "tc_packed_kernel"), names
    assert not _launched(names, "masked_conv2d_tc_kernel"), names
    assert not _launched(names, "scatter_kept_channels_kernel"), names
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    _static_close(got, x, weight, bias, geom, in_mask, out_mask)


# Static input masks on the packed path (N, C_in, C_out, H, W, kernel, stride, padding,
# dilation): kept lists of several 32-channel K steps (a 2x2 kernel over 128 input channels, a
# 1x1 one over 150), stride with dilation on maps of at most 32 output pixels (64-row tiles);
# each within the packed limit (18 K steps a round) with every channel kept too.
STATIC_IN_GEOMETRIES = [
    (2, 128, 40, 7, 6, 2, 1, 1, 1),
    (3, 64, 24, 11, 9, 3, 2, 2, 2),
    (4, 150, 70, 4, 4, 1, 1, 0, 1),
]


@pytest.mark.gpu
@pytest.mark.tf32  # float32 on the tensor cores (TF32), as PyTorch's default has it
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("keep", ["half", "none", "all"])
@pytest.mark.parametrize("geom", STATIC_IN_GEOMETRIES)
def test_cuda_static_in_mask_packed(dtype, channels_last, keep, geom):
    """A static bool in_mask on the packed path: pack_kernel reads x's and the weight's kept
    channels only, in order, into the first packed channels (several K steps of them), so the
    products skip the masked ones; inf and NaN in masked channels of x do not leak. Nothing
    kept gives the bias alone (no K step), everything kept the convolution (TF32 tolerances for
    float32, twice eager's error for bf16)."""
    gen = torch.Generator().manual_seed(17)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    in_mask = {"half": torch.rand(cin, generator=gen) < 0.5,
               "none": torch.zeros(cin, dtype=torch.bool),
               "all": torch.ones(cin, dtype=torch.bool)}[keep].cuda()
    x = x.clone()
    x[:, ~in_mask] = float("nan")
    if (~in_mask).any():
        x[0, (~in_mask).nonzero()[0, 0]] = float("inf")
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(lambda: pyprune.masked_conv2d(
            x, weight, bias, stride, padding, dilation, in_mask=in_mask))
    assert _launched(names, "tc_packed_kernel"), names
    assert not _launched(names, "masked_conv2d_tc_kernel"), names
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.isfinite(got).all()
    if keep == "none":
        assert torch.equal(got, bias[None, :, None, None].expand_as(got))
    else:
        _static_close(got, x.masked_fill(~in_mask[:, None, None], 0), weight, bias, geom,
                      in_mask, None)


# Patch tiles of the packed kernel (N, C_in, C_out, H, W, kernel, stride, padding, dilation,
# masks, expected tiles): whole output rows a tile, X' read from a patch of xp in shared memory.
# Static masks run tiles across samples: 4 x 4 maps (4 samples a tile, a K split over a
# cluster where the tiles leave SMs idle: 16 CTAs, 2 chunks), 14 x 14 maps (tiles crossing a
# sample boundary mid-tile), a single tile of 10 chunks (split 8 ways); per-sample masks keep
# tiles inside a sample; stride and dilation; maps wider than a tile (W_out 70) and 1 x 1
# kernels keep the per-tap copies.
PATCH_GEOMETRIES = [
    ((32, 64, 96, 4, 4, 3, 1, 1, 1), "static", True),
    ((5, 40, 70, 14, 14, 3, 1, 1, 1), "static", True),
    ((2, 300, 64, 4, 4, 3, 1, 1, 1), "static", True),
    ((3, 24, 40, 14, 14, 3, 1, 1, 1), "sample", True),
    ((2, 16, 20, 9, 33, 3, 2, 1, 2), "static", True),
    ((3, 8, 36, 7, 9, 5, 1, 2, 1), "sample", True),
    ((1, 8, 16, 8, 70, 3, 1, 1, 1), "sample", False),
    ((4, 33, 70, 4, 4, 1, 1, 0, 1), "static", False),
]


@pytest.mark.gpu
@pytest.mark.tf32
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,masks,patch", PATCH_GEOMETRIES)
def test_cuda_packed_patch_tiles(dtype, channels_last, geom, masks, patch):
    """The packed kernel's patch tiles against the float64 reference (TF32 tolerances for
    float32, twice eager's error for bf16) with the masked output channels exactly 0, on every
    tiling above, and the same bits on a second call (the K split's partial tiles are summed in
    rank order)."""
    gen = torch.Generator().manual_seed(19)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, dtype, gen, channels_last)
    if masks == "static":
        out_mask = (torch.rand(cout, generator=gen) < 0.5).cuda()
        out_mask[0] = True
    else:
        _, out_mask = _tc_masks(n, cin, cout, gen)
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(lambda: pyprune.masked_conv2d(
            x, weight, bias, stride, padding, dilation, out_mask=out_mask))
        again = pyprune.masked_conv2d(x, weight, bias, stride, padding, dilation,
                                      out_mask=out_mask)
    packed = [name for name in names if "tc_packed_kernel<" in name]
    assert packed and all((", true>" in name) == patch for name in packed), names
    assert torch.equal(got, again)
    if masks == "static":
        _static_close(got, x, weight, bias, geom, None, out_mask)
    else:
        _per_sample_out_close(got, x, weight, bias, geom, out_mask)


@pytest.mark.gpu
@pytest.mark.tf32
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", ["out25", "in", "both"])
@pytest.mark.parametrize("geom", STATIC_TC_GEOMETRIES[:3])
def test_cuda_static_masks_tf32(kind, geom):
    """float32 static masks follow torch.backends.cudnn.allow_tf32: allowed (PyTorch's default),
    a short reduction runs the packed tensor-core kernel (TF32 tolerances); not allowed, cuDNN on
    the compacted problem (float32 tolerances). Gradients (static_backward) match the reference."""
    assert torch.backends.cudnn.allow_tf32
    gen = torch.Generator().manual_seed(15)
    n, cin, cout, h, w, k, stride, padding, dilation = geom
    x, weight, bias = _tc_inputs(geom, torch.float32, gen, False)
    in_mask, out_mask = _static_masks(kind, cin, cout, gen)
    args = (x, weight, bias, stride, padding, dilation)
    with pyprune.use_backend("cuda"):
        got, names = _cuda_kernel_names(
            lambda: pyprune.masked_conv2d(*args, in_mask=in_mask, out_mask=out_mask))
        assert _launched(names, "tc_packed_kernel"), names
        _static_close(got, x, weight, bias, geom, in_mask, out_mask)
        torch.backends.cudnn.allow_tf32 = False
        try:
            full, names = _cuda_kernel_names(
                lambda: pyprune.masked_conv2d(*args, in_mask=in_mask, out_mask=out_mask))
            assert not _launched(names, "masked_conv2d_tc"), names
            _static_close(full, x, weight, bias, geom, in_mask, out_mask)
        finally:
            torch.backends.cudnn.allow_tf32 = True
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = pyprune.masked_conv2d(*leaves, stride, padding, dilation, in_mask=in_mask,
                                    out_mask=out_mask)
        probe = torch.randn(out.shape, generator=gen).cuda()
        grads = torch.autograd.grad((out * probe).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = reference.masked_conv2d(*ref_leaves, stride, padding, dilation, 1, in_mask, out_mask)
    want = torch.autograd.grad((ref * probe.double()).sum(), ref_leaves)
    scale = (cin * k * k + n * h * w) ** 0.5
    for g, r in zip(grads, want):
        torch.testing.assert_close(g.double(), r, atol=TF32_TOLERANCE[0] * scale,
                                   rtol=TF32_TOLERANCE[1] * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("seen", [True, False], ids=["seen", "new"])
def test_cuda_static_tensor_cores_graph_capture(seen):
    """bf16 static masks inside a captured CUDA graph: a mask version seen before the capture
    (kept counts and the in_mask's kept list cached: the packed path) and one first seen under
    capture (the gathering kernel reads both masks on the device) both capture without a host
    synchronisation and replay right."""
    gen = torch.Generator().manual_seed(16)
    geom = (3, 24, 40, 9, 7, 3, 1, 1, 1)
    x, weight, bias = _tc_inputs(geom, torch.bfloat16, gen, False)
    in_mask, out_mask = _static_masks("both", 24, 40, gen)
    with pyprune.use_backend("cuda"):
        out = _captured(lambda: pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=in_mask,
                                                      out_mask=out_mask), warm_up=seen)
    _static_close(out, x, weight, bias, geom, in_mask, out_mask)


# The Triton launcher's choices: tl.dot's input precision and the tile configuration.
TRITON_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[0][1] == "triton"]


@pytest.mark.triton
@pytest.mark.tf32
def test_triton_input_precision_follows_cudnn_tf32():
    """float32 multiplies in TF32 exactly when torch.backends.cudnn.allow_tf32 is set (PyTorch's
    default for convolutions); half types never take the flag."""
    pytest.importorskip("triton")
    from pyprune.triton_kernels.masked_conv import input_precision

    saved = torch.backends.cudnn.allow_tf32
    try:
        for allow in (True, False):
            torch.backends.cudnn.allow_tf32 = allow
            assert input_precision(torch.float32) == ("tf32" if allow else "ieee")
            assert input_precision(torch.float16) == input_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.tf32
@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "ieee"])
def test_triton_launch_precision(device_backend, monkeypatch, allow_tf32):
    """The launcher passes the chosen precision to the kernel, the forward and the transposed
    grad_x alike; with TF32 the result meets TF32 tolerances (scaled by the square root of the
    reduction length), without it float32 ones."""
    device, _ = device_backend
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    spy = spy_conv_launches(monkeypatch)
    geom = (2, 12, 10, 7, 6, 3, 1, 1, 1, 1)
    x, weight, bias, gen = _inputs(geom, torch.float32, device)
    x.requires_grad_()
    out_mask = (torch.rand(2, 10, generator=gen) < 0.5).to(device)
    got = pyprune.masked_conv2d(x, weight, bias, 1, 1, out_mask=out_mask)
    got.backward(torch.ones_like(got))
    assert [k["PRECISION"] for k in spy.launches] == ["tf32" if allow_tf32 else "ieee"] * 2
    want = _expected(x.detach(), weight, bias, geom, out_mask=out_mask)
    scale = (12 * 9) ** 0.5
    if allow_tf32:
        torch.testing.assert_close(got.detach().double(), want, atol=TF32_TOLERANCE[0] * scale,
                                   rtol=TF32_TOLERANCE[1] * scale)
    else:
        _close(got.detach(), want, torch.float32, scale=4.0)


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
@pytest.mark.parametrize("per_sample", [False, True], ids=["static", "per-sample"])
def test_triton_transposed_grad_x_flips_taps_in_the_packing(device_backend, per_sample):
    """grad_x, the forward kernel on the transposed weight with its taps reversed: packed (a
    static out_mask, the transposed launch's in_mask) the packing reads the taps in reverse
    and no flipped copy of the weight is made; unpacked (a per-sample out_mask) the copy is
    made. A 3x2 kernel (tap order matters), against the reference's gradients."""
    device, _ = device_backend
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 6, 7, generator=gen).to(device).requires_grad_()
    weight = torch.randn(10, 12, 3, 2, generator=gen).div(3).to(device).requires_grad_()
    out_mask = (torch.rand(*((2,) if per_sample else ()), 10, generator=gen) < 0.6).to(device)
    y = pyprune.masked_conv2d(x, weight, None, 1, (1, 1), out_mask=out_mask)
    grad = torch.randn(y.shape, generator=gen).to(device)
    with AtenCalls() as seen:
        got = torch.autograd.grad(y, (x, weight), grad)
    assert ("aten::flip" in seen.calls) == per_sample
    ref = [t.detach().double().requires_grad_() for t in (x, weight)]
    want = torch.autograd.grad(reference.masked_conv2d(*ref, None, 1, (1, 1), out_mask=out_mask),
                               ref, grad.double())
    for g, w in zip(got, want):
        _close(g, w, torch.float32, scale=4.0)


@pytest.mark.triton
def test_triton_tile_choice():
    """Every configuration the launcher can choose on sm_80 and sm_90 has an AOT entry for
    that architecture with the launch's options, and no entry is compiled for an architecture
    that does not launch it; tiles cover small dimensions with the smallest choice, stay within
    the architecture's largest tile, cap output channels under a bool output mask and under a
    weight mask, and shrink until the launch keeps 3/4 of the GPU's SMs busy where they can (a
    quarter of the output blocks counted under an output mask), going below 64 pixels only
    while fewer than a quarter of the SMs are busy."""
    pytest.importorskip("triton")
    from pyprune.triton_kernels import masked_conv as kernels

    conv = [v for v in kernels.AOT if v[0] is kernels._masked_conv2d_forward_kernel]
    assert {v[1]["x_ptr"] for v in kernels.AOT if v[0] is kernels._pack_kernel} == {
        "*fp32", "*fp16", "*bf16"}
    for arch in kernels.ARCHS:
        configs = set(kernels._configs(arch))
        aot = {(v[2]["BLOCK_P"], v[2]["BLOCK_CO"], v[2]["BLOCK_CI"], v[2]["SPARSE"])
               for v in conv if arch in v[4]}
        assert configs == aot
        for v in conv:
            if arch in v[4]:
                c = v[2]
                dtype = {"fp32": torch.float32, "fp16": torch.float16,
                         "bf16": torch.bfloat16}[v[1]["x_ptr"][1:]]
                assert v[3]["num_warps"] == kernels._num_warps(
                    c["BLOCK_P"], c["BLOCK_CO"], c["BLOCK_CI"], arch,
                    c["PACKED"] and not kernels._fma(c["PRECISION"], dtype))
                assert c["PREFETCH"] == (not c["PACKED"] and kernels._prefetch(
                    dtype, c["BLOCK_P"], c["BLOCK_CO"], c["BLOCK_CI"], c["SPARSE"],
                    v[3]["num_warps"]))
                # The packed tensors are the launcher's allocations: compiled 16-byte aligned.
                assert v[5] == (("x_ptr", "w_ptr") if c["PACKED"] else ())
        # Each dense configuration in every input-channel kind (listed, scaled) and packed, the
        # weight-mask path in the plain one and packed.
        kinds = {(v[2]["BLOCK_P"], v[2]["BLOCK_CO"], v[2]["SPARSE"], v[1]["x_ptr"],
                  v[2]["PRECISION"], v[2]["IN_LIST"], v[2]["IN_SCALE"], v[2]["PACKED"])
                 for v in conv if arch in v[4]}
        for p, co, sparse, dtype, precision, *_ in kinds:
            for in_list, in_scale in kernels._INPUT_KINDS[:1] if sparse else kernels._INPUT_KINDS:
                assert (p, co, sparse, dtype, precision, in_list, in_scale, False) in kinds
            assert (p, co, sparse, dtype, precision, False, False, True) in kinds
        for c_out, p, n, out_masked, sparse in itertools.product(
                (1, 16, 17, 64, 100, 128, 256, 512), (1, 16, 49, 64, 196, 256, 1024, 3136),
                (1, 2, 32, 128, 256), (False, True), (False, True)):
            if sparse and out_masked:
                continue
            bp, bco, bci = kernels._blocks(c_out, p, n, out_masked, sparse, arch)
            assert (bp, bco, bci, sparse) in configs
            assert bp * bco <= kernels._MAX_TILES[arch]
            assert bco <= (16 if sparse else 32 if out_masked else 128)
            assert bp >= min(32, -(-p // 16) * 16) and bco >= min(16, c_out)
            co_blocks = -(-c_out // bco)
            busy = n * -(-p // bp) * (-(-co_blocks // 4) if out_masked else co_blocks)
            assert 4 * busy >= 3 * kernels._SMS or (bp <= 64 and bco <= 16)
            if bp < 64 <= p:
                assert 4 * busy < kernels._SMS * 2 or bp * 2 * bco > kernels._MAX_TILES[arch]
    assert kernels._blocks(128, 256, 256) == (64, 128, 32)  # the largest tile
    assert kernels._blocks(128, 256, 256, arch=80) == (64, 32, 32)  # sm_80's largest
    assert kernels._blocks(256, 64, 32) == (64, 64, 32)  # 128 programs
    assert kernels._blocks(256, 64, 32, True) == (64, 16, 32)  # 128 programs at a 25% keep
    assert kernels._blocks(7, 10, 256) == (16, 16, 32)  # small sizes: the smallest tiles
    # A static mask on 4x4 maps: one pixel range over the batch's 512 pixels, 64-pixel tiles.
    assert kernels._blocks(512, 32 * 16, 1, True) == (64, 16, 32)


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
def test_triton_static_lists_cached_per_mask_version(device_backend, monkeypatch):
    """A static mask's kept-first list is sorted once per mask version: a second call with the
    same masks sorts nothing, a mask changed in place is sorted again (and the result follows
    it), a per-sample input mask is sorted on every call (a per-sample output mask's lists come
    from the packing launch); every result against the reference."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    monkeypatch.setattr(kernels, "_MASKS", kernels._MaskCache())
    sorts = []
    real = kernels._sort_kept_first
    monkeypatch.setattr(kernels, "_sort_kept_first", lambda m: sorts.append(m.shape) or real(m))
    geom = (3, 10, 12, 5, 6, 3, 1, 1, 1, 1)
    x, weight, bias, gen = _inputs(geom, torch.float32, device, seed=7)
    in_mask = (torch.rand(10, generator=gen) < 0.5).to(device)
    out_mask = (torch.rand(12, generator=gen) < 0.5).to(device)

    def check(i, o):
        got = pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=i, out_mask=o)
        _close(got, _expected(x, weight, bias, geom, in_mask=i, out_mask=o), torch.float32,
               scale=4.0)

    check(in_mask, out_mask)
    assert len(sorts) == 2
    check(in_mask, out_mask)
    assert len(sorts) == 2  # both lists from the cache
    out_mask[~out_mask.clone()] = True  # in place: a new version, all channels kept
    out_mask[0] = False
    check(in_mask, out_mask)
    assert len(sorts) == 3  # the out_mask's list again, the in_mask's cached
    per_sample = (torch.rand(3, 12, generator=gen) < 0.5).to(device)
    check(in_mask, per_sample)
    check(in_mask, per_sample)
    assert len(sorts) == 3  # a per-sample output mask's lists: the packing launch's, no sort
    check(per_sample[:, :10], None)  # unpacked: a per-sample input mask is sorted every call
    check(per_sample[:, :10], None)
    assert len(sorts) == 5


# (N, C_in, C_out, H, W): pixels and channels that are not multiples of the tiles; the last one
# lists ~60 input channels: two chunks of the listed reduction.
TILE_GEOMETRIES = [(2, 40, 70, 13, 11), (1, 33, 100, 15, 10), (2, 20, 40, 12, 13),
                   (2, 100, 24, 7, 9)]


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
@pytest.mark.parametrize("geom", range(len(TILE_GEOMETRIES)))
@pytest.mark.parametrize("masks,packed", [("none", True), ("static", True), ("sample", True),
                                          ("none", False), ("static", False)])
def test_triton_large_tiles(device_backend, monkeypatch, geom, masks, packed):
    """The large tile configurations (chosen here at a small batch by pretending the GPU has
    one SM) against the reference, with tails in pixels and in channels, in float32 (IEEE) and
    bfloat16, with static and per-sample channel masks, packed (x and the weight laid out by
    _pack_kernel first) and, for the masks that pack, not."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    monkeypatch.setattr(kernels, "_SMS", 1)
    monkeypatch.setattr(kernels, "_PACK", packed)
    spy = spy_conv_launches(monkeypatch)
    n, cin, cout, h, w = TILE_GEOMETRIES[geom]
    full = (n, cin, cout, h, w, 3, 1, 1, 1, 1)
    for dtype in (torch.float32, torch.bfloat16):
        x, weight, bias, gen = _inputs(full, dtype, device, seed=geom)
        lead = {"none": None, "static": (), "sample": (n,)}[masks]
        in_mask = out_mask = None
        if lead is not None:
            in_mask = (torch.rand(*lead, cin, generator=gen) < 0.6).to(device)
            out_mask = (torch.rand(*lead, cout, generator=gen) < 0.6).to(device)
        got = pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=in_mask, out_mask=out_mask)
        want = _expected(x, weight, bias, full, in_mask=in_mask, out_mask=out_mask)
        _close(got, want, dtype, scale=4.0 if dtype == torch.float32 else 2.0)
        launch = spy.launches[-1]
        # A per-sample in_mask runs on channel lists (of one sample it is a shared one).
        assert launch["PACKED"] == (packed and (masks != "sample" or n == 1))
        span = 1 if masks == "sample" else n  # masks shared by the batch: tiles span samples
        assert (launch["BLOCK_P"], launch["BLOCK_CO"]) == kernels._blocks(
            cout, h * w * span, n // span, out_mask is not None)[:2]
        assert launch["BLOCK_P"] >= 64
        assert spy.grids[-1][0] == (n // span * -(-h * w * span // launch["BLOCK_P"])
                                    * -(-cout // launch["BLOCK_CO"]))


# (N, C_in, C_out, H, W, (KH, KW), stride, padding, dilation): several chunks of 32 input
# channels under kernels other than 3x3, strides and dilations.
PACKED_CHUNK_GEOMETRIES = [(2, 70, 20, 11, 9, (5, 3), (2, 1), (2, 1), (1, 2)),
                           (1, 65, 33, 6, 7, (1, 2), 1, 0, 1),
                           (2, 48, 16, 9, 9, (3, 3), 2, 1, 1)]


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
@pytest.mark.parametrize("geom", range(len(PACKED_CHUNK_GEOMETRIES)))
def test_triton_packed_chunks_any_kernel(device_backend, monkeypatch, geom):
    """The packed kernel walks a chunk's taps back to back, then the next chunk (KH and KW
    counters, the chunk advanced when the taps wrap): with several chunks of a static in_mask's
    kept channels, any kernel size, stride and dilation, against the reference."""
    device, _ = device_backend
    spy = spy_conv_launches(monkeypatch)
    n, cin, cout, h, w, k, stride, padding, dilation = PACKED_CHUNK_GEOMETRIES[geom]
    gen = torch.Generator().manual_seed(geom)
    x = torch.randn(n, cin, h, w, generator=gen).to(device)
    weight = torch.randn(cout, cin, *k, generator=gen).to(device)
    bias = torch.randn(cout, generator=gen).to(device)
    in_mask = (torch.rand(cin, generator=gen) < 0.8).to(device)
    out_mask = (torch.rand(cout, generator=gen) < 0.6).to(device)
    got = pyprune.masked_conv2d(x, weight, bias, stride, padding, dilation, in_mask=in_mask,
                                out_mask=out_mask)
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), stride, padding,
                                   dilation, 1, in_mask=in_mask, out_mask=out_mask)
    assert spy.launches[-1]["PACKED"]
    assert int(in_mask.sum()) > 32  # several chunks
    _close(got, want, torch.float32, scale=4.0)


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
@pytest.mark.parametrize("in_kind", ["none", "listed", "soft"])
def test_triton_pack_layout(device_backend, in_kind):
    """_pack_kernel's x and weight: xp (N, H + 2 pad_h, W + 2 pad_w, C_pad) holds the listed
    input channels (kept-first; scaled by a soft in_mask) with zero padding, wp (C_out, KH, KW,
    C_pad) the weight's same channels; every channel of the last chunk past the kept count is
    zero in both, and a masked channel is never read (NaN there stays out)."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    gen = torch.Generator().manual_seed(3)
    n, cin, cout, h, w, kh, kw, pad = 2, 45, 6, 5, 7, 3, 2, (2, 1)
    x = torch.randn(n, cin, h, w, generator=gen).to(device)[..., ::1]
    x = torch.cat([x, x], 3)[..., ::2]  # strided
    weight = torch.randn(cout, cin, kh, kw, generator=gen).to(device)
    mask = scale = None
    rows = torch.arange(cin, device=device)
    if in_kind == "listed":
        mask = (torch.rand(1, cin, generator=gen) < 0.6).to(device)
        x[:, ~mask[0]] = float("nan")  # masked: never read
        weight[:, ~mask[0]] = float("nan")
        rows = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[0]
    elif in_kind == "soft":
        scale = torch.rand(n, cin, generator=gen).to(device)
    dummy = torch.empty(1, dtype=torch.int64, device=device)
    order, mask_bytes, _, listed = kernels._kept_first(mask, dummy)
    kept = cin if mask is None else int(mask.sum())
    c_pad = -(-cin // 32) * 32
    xp, wp = kernels._packed(x, weight, pad, c_pad, order, mask_bytes, listed, scale)
    assert xp.shape == (n, h + 4, w + 2, c_pad) and wp.shape == (cout, kh, kw, c_pad)
    chosen = rows[:kept]
    xs = x[:, chosen] * (scale[:, chosen, None, None] if scale is not None else 1)
    want_x = F.pad(xs, (pad[1], pad[1], pad[0], pad[0])).permute(0, 2, 3, 1)
    want_w = weight[:, chosen].permute(0, 2, 3, 1)
    end = -(-kept // 32) * 32  # the chunks the convolution reads
    torch.testing.assert_close(xp[..., :kept], want_x, rtol=0, atol=0)
    torch.testing.assert_close(wp[..., :kept], want_w, rtol=0, atol=0)
    assert (xp[..., kept:end] == 0).all() and (wp[..., kept:end] == 0).all()


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
def test_triton_packs_where_it_can(device_backend, monkeypatch):
    """Launches without a weight mask or a per-sample bool in_mask run packed (one pack launch
    before the convolution), the others on channel lists; with packing off (the unpacked
    kernel's listed and scaled input channels) every result matches the reference too."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    geom = (2, 36, 10, 6, 5, 3, 1, 1, 1, 1)
    x, weight, bias, gen = _inputs(geom, torch.float32, device, seed=5)
    cases = {
        "none": (None, (torch.rand(10, generator=gen) < 0.5).to(device), True),
        "static": ((torch.rand(36, generator=gen) < 0.5).to(device), None, True),
        "soft": (torch.rand(2, 36, generator=gen).to(device), None, True),
        "sample": ((torch.rand(2, 36, generator=gen) < 0.5).to(device), None, False),
    }
    torch.backends.cudnn.allow_tf32, saved = False, torch.backends.cudnn.allow_tf32
    try:
        spy = spy_conv_launches(monkeypatch)
        packs = LaunchSpy(kernels._pack_kernel)
        monkeypatch.setattr(kernels, "_pack_kernel", packs)
        for pack in (True, False):
            monkeypatch.setattr(kernels, "_PACK", pack)
            before = len(packs.grids)
            for name, (in_mask, out_mask, packs_here) in cases.items():
                got = pyprune.masked_conv2d(x, weight, bias, 1, 1, in_mask=in_mask,
                                            out_mask=out_mask)
                want = _expected(x, weight, bias, geom, in_mask=in_mask, out_mask=out_mask)
                _close(got, want, torch.float32, scale=4.0)
                assert spy.launches[-1]["PACKED"] == (pack and packs_here), name
            assert len(packs.grids) - before == (3 if pack else 0)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device_backend", TRITON_BACKENDS, indirect=True)
def test_triton_pack_orders_per_sample_output_masks(device_backend):
    """The packing launch writes each row of a per-sample bool out_mask as its kept-first list,
    exactly the stable descending sort the unpacked path runs: rows longer than one block of
    256, all kept, none kept, and the last channel alone kept."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    gen = torch.Generator().manual_seed(11)
    c_out = 300
    x = torch.randn(5, 3, 4, 4, generator=gen).to(device)
    weight = torch.randn(c_out, 3, 1, 1, generator=gen).to(device)
    masks = torch.rand(5, c_out, generator=gen) < 0.4
    masks[1] = True
    masks[2] = False
    masks[3] = False
    masks[3, -1] = True
    masks = masks.to(device)
    dummy = torch.empty(1, dtype=torch.int64, device=device)
    order, mask_bytes, _, listed = kernels._kept_first(None, dummy)
    out_order, out_bytes, per_sample, _ = kernels._kept_first(masks, dummy, sort=False)
    assert per_sample == 1
    kernels._packed(x, weight, (0, 0), 32, order, mask_bytes, listed, None, out_order, out_bytes)
    assert torch.equal(out_order, kernels._sort_kept_first(masks))


def test_memory_format_matches_suggest_memory_format():
    """pyprune._layout.memory_format (cached by shape and strides) answers as
    torch._prims_common.suggest_memory_format on every layout, symbolic shapes included."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from pyprune import _layout

    suggest = torch._prims_common.suggest_memory_format
    base = torch.randn(4, 6, 5, 3)
    tensors = [base, base.contiguous(memory_format=torch.channels_last),
               base[:, ::2], base.transpose(0, 1), base.permute(0, 2, 3, 1),
               base.flip(2, 3), base[:1, :1], torch.randn(2, 1, 4, 4),
               torch.randn(2, 1, 4, 4).contiguous(memory_format=torch.channels_last),
               torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last),
               torch.randn(0, 3, 4, 4), torch.randn(3, 4), torch.randn(2, 3, 4, 5, 6),
               torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
               base.to("meta"), base.to_sparse()]
    for t in tensors:
        assert _layout.memory_format(t) == suggest(t), (tuple(t.shape), t.layout)
        assert _layout.memory_format(t) == suggest(t)  # cached: the same answer
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        for t in tensors[:2]:
            fake = mode.from_tensor(t, static_shapes=False)
            assert not all(type(v) is int for v in fake.shape)
            assert _layout.memory_format(fake) == suggest(t)
