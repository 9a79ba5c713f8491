"""No host synchronisation on the Triton path (SPEC section 3): every op, module forward and
backward and loss runs with the triton backend forced while a dispatch mode raises on any op
that reads device data on the host or sizes an output by it.

On the CPU, reading a tensor's values costs no sync, so pyprune reads them there (eager argument
checks raise a ValueError before any kernel). The one predicate deciding that,
``_validate.host_reads_free``, is patched to answer as for a CUDA tensor, so the CPU tensors the
interpreter runs on take the path CUDA tensors take."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import pyprune
from pyprune import _backend, _validate, chipnet
from pyprune import nn as pnn

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(_backend.unavailable_reason("triton", "cpu") is not None,
                       reason=str(_backend.unavailable_reason("triton", "cpu"))),
]

aten = torch.ops.aten

# Ops that copy device data to the host, or whose output size depends on it (so the host waits
# for the values): a CUDA stream would stall on each.
_SYNCING = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose,
    aten.nonzero, aten.argwhere, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
    aten.unique_consecutive, aten.bincount, aten.histc, aten.nonzero_numpy,
}
# Sized by the repeats' values unless the caller gives the size.
_SIZED_BY_REPEATS = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
_HOST_METHODS = ("tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "item")


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises HostSync on any syncing op. The Python bodies of pyprune's custom ops run under
    the mode too (a dispatch mode otherwise sees a custom op as one opaque call)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNCING:
            raise HostSync(f"{func} synchronises with the host")
        if func in _SIZED_BY_REPEATS and kwargs.get("output_size") is None:
            raise HostSync(f"{func} without output_size synchronises with the host")
        if packet in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise HostSync(f"{func} with a bool index synchronises with the host (nonzero)")
        opdef = OPDEFS.get(func.name()) if func.namespace == "pyprune" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} reads device data on the host")
        return method

    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for name in _HOST_METHODS:
            mp.setattr(torch.Tensor, name, refuse(name))
        stack.enter_context(NoHostSync())
        yield


@pytest.fixture(autouse=True)
def triton_as_on_cuda(monkeypatch):
    monkeypatch.setattr(_validate, "host_reads_free", lambda t: False)
    with pyprune.use_backend("triton"):
        yield


def _leaf(*shape, **kw):
    return torch.randn(*shape, **kw).requires_grad_()


def _run(fn, *leaves):
    """fn() and the backward of its outputs' sum to the leaves, all without a host sync."""
    with no_host_sync():
        out = fn()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward([o.float().sum() for o in outs])
    for leaf in leaves:
        if leaf.requires_grad:
            assert leaf.grad is not None


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad.sum().item()
        return grad


def test_mode_catches_syncs():
    x = torch.randn(4)
    leaf = _leaf(4)
    for fn in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: bool(x.sum() > 0),
               lambda: x[x > 0], lambda: x.tolist(), lambda: int(x.argmax()),
               lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 0])),
               lambda: _SyncInBackward.apply(leaf).sum().backward()):
        with pytest.raises(HostSync):
            with no_host_sync():
                fn()


@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_kwta(mode):
    x = _leaf(2, 8, 4, 4)
    _run(lambda: pyprune.kwta(x, 0.25, mode=mode), x)


@pytest.mark.parametrize("exact", [True, False])
def test_sap(exact):
    x = _leaf(2, 4, 4, 4)
    _run(lambda: pyprune.sap(x, 0.5, exact=exact), x)


@pytest.mark.parametrize("multiplicative", [False, True])
def test_gaussian_noise(multiplicative):
    x = _leaf(2, 4, 4, 4)
    _run(lambda: pyprune.gaussian_noise(x, 0.1, multiplicative=multiplicative), x)


def test_magnitude_mask():
    w = torch.randn(8, 4, 3, 3)
    _run(lambda: pyprune.magnitude_mask(w, 0.3))


@pytest.mark.parametrize("labelled", [True, False])
def test_cas(labelled):
    x, w, b = _leaf(4, 8, 3, 3), _leaf(5, 8), _leaf(5)
    label = torch.randint(5, (4,)) if labelled else None
    _run(lambda: pyprune.cas(x, w, b, label), x, w, b)


def _conv_args():
    return _leaf(2, 6, 5, 5), _leaf(4, 6, 3, 3), _leaf(4)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_masked_conv2d_channel_masks(per_sample, soft):
    x, w, b = _conv_args()
    lead = (2,) if per_sample else ()
    in_mask, out_mask = torch.rand(*lead, 6) > 0.4, torch.rand(*lead, 4) > 0.4
    if soft:
        in_mask, out_mask = in_mask.float().requires_grad_(), out_mask.float().requires_grad_()
    _run(lambda: pyprune.masked_conv2d(x, w, b, padding=1, in_mask=in_mask, out_mask=out_mask),
         x, w, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_masked_conv2d_weight_mask(stride):
    x, w, b = _conv_args()
    weight_mask = torch.rand(w.shape) > 0.7
    _run(lambda: pyprune.masked_conv2d(x, w, b, stride, 1, weight_mask=weight_mask), x, w, b)


def _module_cases():
    conv = pnn.MaskedConv2d(6, 4, 3, padding=1)
    conv_masks = [
        ("in_out", dict(in_mask=torch.rand(6) > 0.4, out_mask=torch.rand(4) > 0.4)),
        ("per_sample", dict(in_mask=torch.rand(2, 6) > 0.4)),
        ("soft", dict(out_mask=torch.rand(4))),
        ("weight", dict(weight_mask=torch.rand(4, 6, 3, 3) > 0.7)),
    ]
    cases = [
        ("KWTA", pnn.KWTA(0.25), (2, 8, 4, 4)),
        ("KWTA_channel", pnn.KWTA(0.25, mode="channel"), (2, 8, 4, 4)),
        ("SAP", pnn.SAP(0.5), (2, 4, 4, 4)),
        ("SAP_bernoulli", pnn.SAP(0.5, exact=False), (2, 4, 4, 4)),
        ("GaussianNoise", pnn.GaussianNoise(0.1), (2, 4, 4, 4)),
        ("MaskedConv2d", conv, (2, 6, 5, 5)),
        *[(f"MaskedConv2d_{n}", pnn.MaskedConv2d(6, 4, 3, padding=1).set_masks(**m), (2, 6, 5, 5))
          for n, m in conv_masks],
        ("ChannelGate", pnn.ChannelGate(6, 4, 0.5), (2, 6, 5, 5)),
        ("ChipMask", pnn.ChipMask(6), (2, 6, 5, 5)),
        ("NoisyWeight", pnn.NoisyWeight(torch.nn.Conv2d(6, 4, 3), 0.1), (2, 6, 5, 5)),
        ("MagnitudePruned", pnn.MagnitudePruned(torch.nn.Conv2d(6, 4, 3), 0.3), (2, 6, 5, 5)),
    ]
    return [pytest.param(m, s, id=n) for n, m, s in cases]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("module,shape", _module_cases())
def test_module(module, shape, train):
    module.train(train)
    x = _leaf(*shape)
    _run(lambda: module(x), x, *[p for p in module.parameters() if p.requires_grad])


@pytest.mark.parametrize("train", [True, False])
def test_cas_module(train):
    module = pnn.CAS(8, 5).train(train)
    x = _leaf(4, 8, 3, 3)
    label = torch.randint(5, (4,))
    _run(lambda: module(x, label) if train else module(x), x, *module.parameters())


def test_cas_loss():
    logits = [_leaf(4, 5), _leaf(4, 5)]
    label = torch.randint(5, (4,))
    _run(lambda: pyprune.cas_loss(logits, label), *logits)


def test_pc_loss():
    features, centroids = _leaf(4, 3, 2), _leaf(5, 6)
    label = torch.randint(5, (4,))
    _run(lambda: pyprune.pc_loss(features, centroids, label), features, centroids)


@pytest.mark.parametrize("kind", chipnet.KINDS)
def test_chipnet_losses(kind):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), pnn.ChipMask(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 4, 3), pnn.ChipMask(4))
    example = torch.randn(1, 3, 8, 8)
    chipnet.budget_loss(model, 0.5, kind, example)  # traces the model once, outside the check
    gates = [p for m in model if isinstance(m, pnn.ChipMask) for p in m.parameters()]
    _run(lambda: (pyprune.crispness_loss(model), chipnet.budget_loss(model, 0.5, kind)), *gates)


def test_label_range_is_checked_on_the_device():
    with no_host_sync():
        _validate.label_range(torch.tensor([0, 4]), 5)
    with pytest.raises(RuntimeError, match=r"label values must be in \[0, 5\)"):
        _validate.label_range(torch.tensor([0, 5]), 5)
