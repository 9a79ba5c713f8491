"""Every op, module (train and eval) and loss captured in a CUDA graph, forward and backward, on
the cuda and triton backends, then replayed with new inputs copied into the captured tensors.

Deterministic cases must give what an eager call gives on the new inputs. Seeded ops must draw
anew on every replay (their seed is drawn on the device from torch's generator, whose state a
captured graph advances on each replay, as torch's dropout does) and their backward must use the
replay's own draws: SAP and multiplicative noise are linear in x, so y == x * dy/dx holds for
the draws of each replay. A host synchronisation anywhere makes the capture itself fail.

GPU only (skipped without CUDA); `make gpu` runs them on the GPU machine.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import pyprune
from pyprune import chipnet
from pyprune import nn as pnn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
BACKENDS = [pytest.param("cuda"), pytest.param("triton", marks=pytest.mark.triton)]
DEVICE = "cuda"
ATOL = RTOL = 2e-4  # float32; TF32 convolutions run the same algorithms in eager and replay


def _outputs(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor)]


def _step(fn: Callable, leaves: list[torch.Tensor], backward: bool):
    """fn()'s outputs and, with backward, the gradients of their float sum to the leaves."""
    outs = _outputs(fn())
    grads = []
    if backward:
        diff = [o for o in outs if o.requires_grad]
        loss = sum(o.float().sum() for o in diff)
        grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
    return outs, grads


class Captured:
    """fn over static tensors, captured with its backward after a warm-up on a side stream
    (kernels compiled, cuDNN plans and static-mask indices cached outside the capture)."""

    def __init__(self, fn: Callable, leaves: list[torch.Tensor], backward: bool = True):
        self.fn, self.leaves, self.backward = fn, leaves, backward
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _step(fn, leaves, backward)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outs, self.grads = _step(fn, leaves, backward)

    def replay(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.graph.replay()
        torch.cuda.synchronize()
        return [o.clone() for o in self.outs], [None if g is None else g.clone() for g in self.grads]


def _refill(tensors: list[torch.Tensor]) -> None:
    """New values into the captured inputs, in place (float: normal; int: labels of the 10
    classes every case here has)."""
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
            elif t.dtype == torch.bool:
                t.copy_(torch.rand(t.shape, device=t.device) < 0.5)
            else:
                t.copy_(torch.randint_like(t, 10))


def _close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


def check_deterministic(fn: Callable, leaves: list[torch.Tensor], others=(), backward=True):
    """Replay with new inputs == an eager call on them."""
    captured = Captured(fn, leaves, backward)
    for _ in range(2):
        _refill([*leaves, *others])
        got = captured.replay()
        want = _step(fn, leaves, backward)
        _close(got[0], want[0])
        _close(got[1], want[1])


def check_seeded_linear(fn: Callable, x: torch.Tensor, backward=True):
    """fn(x) = x * s(seed) for a random s drawn anew each replay; backward uses that s."""
    captured = Captured(fn, [x], backward)
    outs = []
    for _ in range(2):
        _refill([x])
        (y,), grads = captured.replay()
        if backward:
            torch.testing.assert_close(y, x.detach() * grads[0], atol=1e-5, rtol=1e-5)
        outs.append(y / x.detach())
    assert not torch.equal(outs[0], outs[1]), "a replay reused the previous replay's draws"


def _leaf(*shape):
    return torch.randn(*shape, device=DEVICE).requires_grad_()


@pytest.fixture(params=BACKENDS)
def backend(request):
    with pyprune.use_backend(request.param):
        yield request.param


# Ops

@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_kwta(backend, mode):
    x = _leaf(8, 16, 8, 8)
    check_deterministic(lambda: pyprune.kwta(x, 0.2, mode=mode), [x])


@pytest.mark.parametrize("exact", [True, False])
def test_sap(backend, exact):
    x = _leaf(8, 16, 8, 8)
    check_seeded_linear(lambda: pyprune.sap(x, 0.5, exact=exact), x)


def test_gaussian_noise_multiplicative(backend):
    x = _leaf(8, 16, 8, 8)
    check_seeded_linear(lambda: pyprune.gaussian_noise(x, 0.5, multiplicative=True), x)


def test_gaussian_noise_additive(backend):
    x = _leaf(8, 16, 8, 8)
    captured = Captured(lambda: pyprune.gaussian_noise(x, 0.5), [x])
    noise = []
    for _ in range(2):
        _refill([x])
        (y,), (grad,) = captured.replay()
        assert torch.equal(grad, torch.ones_like(x))
        noise.append(y - x.detach())
    assert not torch.equal(noise[0], noise[1])
    assert abs(noise[1].std().item() - 0.5) < 0.05


def test_magnitude_mask(backend):
    w = torch.randn(32, 16, 3, 3, device=DEVICE)
    check_deterministic(lambda: pyprune.magnitude_mask(w, 0.3), [], [w], backward=False)


@pytest.mark.parametrize("labelled", [True, False])
def test_cas(backend, labelled):
    x, w, b = _leaf(8, 32, 4, 4), _leaf(10, 32), _leaf(10)
    label = torch.randint(10, (8,), device=DEVICE) if labelled else None
    check_deterministic(lambda: pyprune.cas(x, w, b, label), [x, w, b],
                        [] if label is None else [label])


@pytest.mark.triton
def test_triton_counters_across_streams():
    """The Triton launches that count with atomics (SAP bernoulli, the CAS forward) keep their
    counters per stream between launches (triton_kernels/_counters; graphs above capture a
    fill of their own): calls alternating between two streams, each stream's calls queued back
    to back, give what one eager call gives, and every kept buffer is zero once the device is
    idle."""
    from pyprune.triton_kernels import _counters

    x = torch.randn(8, 16, 8, 8, device=DEVICE)
    w, b = torch.randn(10, 16, device=DEVICE), torch.randn(10, device=DEVICE)
    label = torch.randint(10, (8,), device=DEVICE)

    def calls():
        gen = torch.Generator(DEVICE).manual_seed(3)
        return pyprune.sap(x, 0.5, exact=False, generator=gen), *pyprune.cas(x, w, b, label)

    with pyprune.use_backend("triton"):
        want = calls()
        streams = [torch.cuda.Stream() for _ in range(2)]
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream())
        got = []
        for i in range(6):
            with torch.cuda.stream(streams[i % 2]):
                got.append(calls())
        torch.cuda.synchronize()
    for outs in got:
        for g, w_ in zip(outs, want):
            assert torch.equal(g, w_)
    assert len(_counters._BUFFERS) >= 3  # the default stream's and each side stream's
    assert all(not buf.any() for buf in _counters._BUFFERS.values())


@pytest.mark.parametrize("kind", ["static", "per_sample", "soft_static", "soft_per_sample", "weight"])
def test_masked_conv2d(backend, kind):
    x, w, b = _leaf(4, 16, 9, 9), _leaf(24, 16, 3, 3), _leaf(24)
    lead = (4,) if "per_sample" in kind else ()
    masks = {}
    if kind == "weight":
        masks["weight_mask"] = torch.rand(w.shape, device=DEVICE) < 0.3
    else:
        masks["in_mask"] = torch.rand(*lead, 16, device=DEVICE) < 0.5
        masks["out_mask"] = torch.rand(*lead, 24, device=DEVICE) < 0.5
        if "soft" in kind:
            masks = {k: m.float().requires_grad_() for k, m in masks.items()}
    leaves = [x, w, b] + [m for m in masks.values() if m.requires_grad]
    # The masks stay as captured (a static mask's kept channels are part of the graph).
    check_deterministic(lambda: pyprune.masked_conv2d(x, w, b, 1, 1, **masks), leaves)


# Modules

def _modules() -> list:
    conv_masks = {
        "static": lambda: dict(in_mask=torch.rand(16) < 0.5, out_mask=torch.rand(24) < 0.5),
        "per_sample": lambda: dict(in_mask=torch.rand(4, 16) < 0.5),
        "soft": lambda: dict(out_mask=torch.rand(24)),
        "weight": lambda: dict(weight_mask=torch.rand(24, 16, 3, 3) < 0.3),
    }
    cases = [
        ("KWTA", lambda: pnn.KWTA(0.25), (4, 16, 8, 8), False),
        ("KWTA_channel", lambda: pnn.KWTA(0.25, mode="channel"), (4, 16, 8, 8), False),
        ("SAP", lambda: pnn.SAP(0.5), (4, 16, 8, 8), True),
        ("SAP_bernoulli", lambda: pnn.SAP(0.5, exact=False), (4, 16, 8, 8), True),
        ("GaussianNoise", lambda: pnn.GaussianNoise(0.1, multiplicative=True), (4, 16, 8, 8), True),
        ("MaskedConv2d", lambda: pnn.MaskedConv2d(16, 24, 3, padding=1), (4, 16, 9, 9), False),
        *[(f"MaskedConv2d_{n}", (lambda m=m: pnn.MaskedConv2d(16, 24, 3, padding=1).set_masks(**m())),
           (4, 16, 9, 9), False) for n, m in conv_masks.items()],
        ("ChipMask", lambda: pnn.ChipMask(16), (4, 16, 9, 9), False),
        ("MagnitudePruned", lambda: pnn.MagnitudePruned(torch.nn.Conv2d(16, 24, 3), 0.3),
         (4, 16, 9, 9), False),
    ]
    return [pytest.param(make, shape, random, id=name) for name, make, shape, random in cases]


@pytest.mark.parametrize("make,shape,random", _modules())
@pytest.mark.parametrize("train", [True, False])
def test_module(backend, make, shape, random, train):
    module = make().to(DEVICE).train(train)
    x = _leaf(*shape)
    params = [p for p in module.parameters() if p.requires_grad]
    if random:  # SAP and noise draw in eval() too (test-time defences)
        check_seeded_linear(lambda: module(x), x)
    else:
        check_deterministic(lambda: module(x), [x, *params])


@pytest.mark.parametrize("make,shape,random", _modules())
def test_module_inference(backend, make, shape, random):
    """eval() under no_grad: MaskedConv2d's compacted inference path included."""
    module = make().to(DEVICE).eval()
    x = torch.randn(*shape, device=DEVICE)

    def forward():
        with torch.no_grad():
            return module(x)

    if random:
        check_seeded_linear(forward, x, backward=False)
    else:
        check_deterministic(forward, [], [x], backward=False)


def test_noisy_weight(backend):
    module = pnn.NoisyWeight(torch.nn.Conv2d(16, 24, 3), 0.5).to(DEVICE).train()
    x = torch.randn(4, 16, 9, 9, device=DEVICE)
    captured = Captured(lambda: module(x), list(module.parameters()))
    first = captured.replay()[0][0]
    assert not torch.equal(first, captured.replay()[0][0])


def test_channel_gate(backend):
    gate = pnn.ChannelGate(16, 24, 0.25).to(DEVICE)
    x = _leaf(4, 16, 9, 9)
    check_deterministic(lambda: gate(x), [x, *gate.parameters()])


@pytest.mark.parametrize("train", [True, False])
def test_cas_module(backend, train):
    module = pnn.CAS(32, 10).to(DEVICE).train(train)
    x = _leaf(8, 32, 4, 4)
    label = torch.randint(10, (8,), device=DEVICE)
    check_deterministic((lambda: module(x, label)) if train else (lambda: module(x)),
                        [x, *module.parameters()], [label] if train else [])


# Losses

def test_cas_loss(backend):
    logits = [_leaf(8, 10), _leaf(8, 10)]
    label = torch.randint(10, (8,), device=DEVICE)
    check_deterministic(lambda: pyprune.cas_loss(logits, label), logits, [label])


def test_pc_loss(backend):
    features, centroids = _leaf(8, 3, 2), _leaf(10, 6)
    label = torch.randint(10, (8,), device=DEVICE)
    check_deterministic(lambda: pyprune.pc_loss(features, centroids, label),
                        [features, centroids], [label])


@pytest.mark.parametrize("kind", chipnet.KINDS)
def test_chipnet_losses(backend, kind):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), pnn.ChipMask(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 4, 3), pnn.ChipMask(4)).to(DEVICE)
    chipnet.budget_loss(model, 0.5, kind, torch.randn(1, 3, 8, 8, device=DEVICE))
    gates = [p for m in model if isinstance(m, pnn.ChipMask) for p in m.parameters()]
    check_deterministic(lambda: (pyprune.crispness_loss(model), chipnet.budget_loss(model, 0.5, kind)),
                        gates)
