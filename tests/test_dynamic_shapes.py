"""torch.compile(fullgraph=True) with dynamic shapes: batch and spatial sizes change between
calls, under automatic dynamic shapes and under dynamic=True. Every op compiles no more graphs
than the same sequence of shapes costs a plain-PyTorch function (torch's own recompiles: the
first static graph, the switch to dynamic sizes, size-1 specialization), and matches eager."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import pyprune

SHAPES = [(2, 4, 8, 8), (2, 4, 6, 6), (3, 4, 6, 6), (1, 4, 5, 5), (5, 4, 7, 7), (4, 4, 9, 9)]


def _frames(fn, dynamic, shapes=SHAPES, check=None) -> int:
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    for shape in shapes:
        x = torch.randn(*shape)
        got = compiled(x)
        if check is not None:
            check(x, got)
    return counter.frame_count


def _baseline(dynamic) -> int:
    return _frames(lambda x: torch.relu(x) * x.flatten(1).sum(1)[:, None, None, None], dynamic)


def _ops(device_backend):
    weight = torch.randn(5, 4)
    conv_w = torch.randn(6, 4, 3, 3)
    proj = torch.randn(4, 6)
    keep = torch.tensor([True, False, True, True, False, True])

    def seeded(fn):
        # Random ops: the same seed for the compiled and the eager call.
        def call(x):
            return fn(x, torch.Generator().manual_seed(0))
        return call

    return {
        "kwta": (lambda x: pyprune.kwta(x, 0.3), None),
        "kwta-channel": (lambda x: pyprune.kwta(x, 0.25, mode="channel", absolute=True), None),
        "kwta-k": (lambda x: pyprune.kwta(x, k=3, mode="channel"), None),
        "sap": (lambda x: pyprune.sap(x.abs(), 0.5), "random"),
        "noise": (lambda x: pyprune.gaussian_noise(x, 0.1, multiplicative=True), "random"),
        "cas": (lambda x: pyprune.cas(x, weight)[0], None),
        "cas-label": (lambda x: pyprune.cas(x, weight, None,
                                           torch.zeros(x.shape[0], dtype=torch.int64))[0], None),
        "magnitude_mask": (lambda x: pyprune.magnitude_mask(x, 0.3).to(x.dtype), None),
        "masked_conv2d": (lambda x: pyprune.masked_conv2d(x, conv_w, padding=1, out_mask=keep),
                          None),
        "masked_conv2d-sample": (lambda x: pyprune.masked_conv2d(
            x, conv_w, padding=1, out_mask=x.mean((2, 3)) @ proj > 0), None),
    }


NAMES = ["kwta", "kwta-channel", "kwta-k", "sap", "noise", "cas", "cas-label", "magnitude_mask",
         "masked_conv2d", "masked_conv2d-sample"]


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("name", NAMES)
def test_no_recompile_per_shape(device_backend, name, dynamic):
    device, backend = device_backend
    if device != "cpu":
        pytest.skip("CPU shapes")
    fn, kind = _ops(device_backend)[name]

    def check(x, got):
        if kind == "random":
            assert got.shape == x.shape  # values differ by draw; shape and finiteness checked
            assert got.isfinite().all()
        else:
            torch.testing.assert_close(got, fn(x), rtol=1e-5, atol=1e-5)

    assert _frames(fn, dynamic, check=check) <= _baseline(dynamic)


class _Model(torch.nn.Module):
    """Every pyprune module in one model: conv with noisy and pruned weights, the activations,
    a channel mask and CAS (label in training, argmax in eval)."""

    def __init__(self):
        super().__init__()
        self.conv = pyprune.nn.NoisyWeight(torch.nn.Conv2d(3, 8, 3, padding=1), 0.05)
        self.pruned = pyprune.nn.MagnitudePruned(torch.nn.Conv2d(8, 8, 3, padding=1), 0.5)
        self.acts = torch.nn.Sequential(
            pyprune.nn.KWTA(0.2), pyprune.nn.GaussianNoise(0.1), pyprune.nn.SAP(0.5),
            pyprune.nn.KWTA(k=4, mode="channel"), pyprune.nn.ChipMask(8))
        self.cas = pyprune.nn.CAS(8, 5)

    def forward(self, x):
        y = self.acts(self.pruned(self.conv(x)))
        label = torch.zeros(x.shape[0], dtype=torch.int64) if self.training else None
        out, logits = self.cas(y, label)
        return out.sum((1, 2, 3)) + logits.sum(1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_change_size(device_backend, training):
    """A model with every module, at 12x12 then 10x10 then other batches (small: the Triton
    interpreter runs it)."""
    device, _ = device_backend
    if device != "cpu":
        pytest.skip("CPU shapes")
    model = _Model().train(training)
    shapes = [(4, 3, 12, 12), (4, 3, 10, 10), (3, 3, 10, 10), (6, 3, 8, 8)]
    baseline = _frames(lambda x: torch.relu(x).sum(1), None, shapes)
    check = (lambda x, y: y.sum().backward()) if training else None
    assert _frames(model, None, shapes, check=check) <= baseline
