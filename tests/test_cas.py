"""CAS on every backend against pyprune.reference (float64): both modes, gradients, opcheck,
compile, bad input, the module."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyprune
from pyprune import reference
from pyprune.ops.cas import _OPS

from .conftest import DEVICE_BACKENDS, TOLERANCES, LaunchSpy, dtypes_for

# (N, K, H, W, classes): odd and power-of-2 sizes; 1x1 maps, one class; (1, 40, 17, 17) spans
# two chunks of L in the Triton kernels (rows longer than 256).
CASES = [
    (3, 5, 7, 7, 4),
    (4, 16, 8, 8, 10),
    (2, 32, 4, 4, 3),
    (2, 8, 17, 3, 1),
    (3, 20, 1, 1, 7),
    (1, 40, 17, 17, 5),
]


def _inputs(n, k, h, w, classes, dtype, device, *, gap=0.1, seed=0):
    """x, weight, bias, label whose float64 logits (from the rounded values) have a top-2 gap of
    at least ``gap`` in every sample, so every dtype's argmax agrees with float64's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, h, w, generator=gen).to(dtype)
    weight = torch.randn(classes, k, generator=gen).to(dtype)
    bias = torch.randn(classes, generator=gen).mul(2).to(dtype)
    label = torch.randint(classes, (n,), generator=gen)
    # The samples whose gap is too small are drawn again (each alone: a batch of hundreds
    # would almost never draw all of its samples separated at once).
    for _ in range(200):
        logits = F.linear(x.double().mean((2, 3)), weight.double(), bias.double())
        top = logits.topk(min(2, classes), dim=1).values
        close = (top[:, 0] - top[:, 1] <= gap) if classes > 1 else torch.zeros(n, dtype=torch.bool)
        if not bool(close.any()):
            return tuple(t.to(device) for t in (x, weight, bias, label))
        x[close] = torch.randn(int(close.sum()), k, h, w, generator=gen).to(dtype)
    raise AssertionError("no draw gave separated logits")


def _expected(x, weight, bias, label):
    out, logits = reference.cas(x.double(), weight.double(),
                                None if bias is None else bias.double(), label)
    return out.to(x.dtype), logits.to(x.dtype)


def _close(got, want, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("shape", CASES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["label", "argmax"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device_backend, shape, train, with_bias):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        x, weight, bias, label = _inputs(*shape, dtype, device)
        bias = bias if with_bias else None
        if not with_bias:  # the gap was checked with the bias: recheck without it
            x, weight, _, label = _inputs(*shape, dtype, device, seed=1000)
            logits = F.linear(x.double().mean((2, 3)), weight.double())
            if shape[4] > 1 and not train:
                top = logits.topk(2, dim=1).values
                if not bool((top[:, 0] - top[:, 1] > 0.05).all()):
                    continue
        label = label if train else None
        out, logits = pyprune.cas(x, weight, bias, label)
        want_out, want_logits = _expected(x, weight, bias, label)
        assert out.dtype == dtype and logits.dtype == dtype
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)  # x * m is exact in x's dtype
        _close(logits, want_logits, dtype, scale=10)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed"])
@pytest.mark.parametrize("train", [True, False], ids=["label", "argmax"])
def test_layouts(device_backend, layout, train):
    device, backend = device_backend
    x, weight, bias, label = _inputs(4, 6, 9, 10, 5, torch.float32, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], 0)[::2]
    else:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    label = label if train else None
    out, logits = pyprune.cas(x, weight, bias, label)
    want_out, want_logits = _expected(x, weight, bias, label)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    _close(logits, want_logits, torch.float32)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    # Gradients in the same layout.
    xg = x.detach().requires_grad_()
    g = torch.randn_like(want_out)
    gl = torch.randn_like(want_logits)
    o, lg = pyprune.cas(xg, weight, bias, label)
    (got,) = torch.autograd.grad((o, lg), xg, (g, gl))
    xr = x.double().requires_grad_()
    o, lg = reference.cas(xr, weight.double(), bias.double(), label)
    (want,) = torch.autograd.grad((o, lg), xr, (g.double(), gl.double()))
    _close(got, want, torch.float32)


def test_argmax_ties_and_nan(device_backend):
    """torch.argmax's order: the first index wins ties, NaN counts as largest (first NaN wins)."""
    device, _ = device_backend
    x = torch.randn(3, 4, 2, 2, device=device)
    weight = torch.randn(5, 4, device=device)
    weight[3] = weight[1]
    bias = torch.full((5,), -50.0, device=device)
    bias[1] = bias[3] = 50.0  # classes 1 and 3 tie exactly
    out, logits = pyprune.cas(x, weight, bias)
    assert torch.equal(logits[:, 1], logits[:, 3])
    torch.testing.assert_close(out, x * weight[1][:, None, None], atol=0, rtol=0)
    bias[4] = float("nan")
    bias[2] = float("nan")
    out, logits = pyprune.cas(x, weight, bias)
    assert logits[:, 2].isnan().all()
    torch.testing.assert_close(out, x * weight[2][:, None, None], atol=0, rtol=0)


@pytest.mark.parametrize("train", [True, False], ids=["label", "argmax"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_reference(device_backend, train, with_bias):
    device, backend = device_backend
    # Spatial sizes with and without the CPU kernel's fixed-length row loops (1, 4, 16, 49, 64);
    # 20 classes (the Triton backward forms grad_logits @ weight in two steps of 16 classes) and
    # 70 (past 64: a GEMM before the stream, and the many-class gathers).
    shapes = [(3, 6, 5, 5, 4), (2, 40, 17, 17, 3), (2, 24, 8, 8, 5), (2, 16, 4, 4, 3),
              (2, 12, 7, 7, 3), (2, 10, 1, 1, 4), (2, 9, 2, 2, 2), (3, 12, 3, 3, 20),
              (2, 8, 3, 3, 70)]
    for shape in shapes:
        for dtype in dtypes_for(backend):
            x, weight, bias, label = _inputs(*shape, dtype, device)
            bias = bias if with_bias else None
            label = label if train else None
            gen = torch.Generator().manual_seed(5)
            g = torch.randn(x.shape, generator=gen).to(dtype).to(device)
            gl = torch.randn(shape[0], shape[4], generator=gen).to(dtype).to(device)
            leaves = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
            o, lg = pyprune.cas(leaves[0], leaves[1], leaves[2] if with_bias else None, label)
            got = torch.autograd.grad((o, lg), leaves, (g, gl))
            ref = [t.double().requires_grad_() for t in leaves]
            o, lg = reference.cas(ref[0], ref[1], ref[2] if with_bias else None, label)
            want = torch.autograd.grad((o, lg), ref, (g.double(), gl.double()))
            for name, a, b in zip(("x", "weight", "bias"), got, want):
                assert a.dtype == dtype, name
                _close(a, b, dtype, scale=max(1.0, float(b.abs().max())) * 4)


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("classes", [5, 70], ids=lambda c: f"classes{c}")
def test_weight_gradient_keeps_nonfinite_in_its_row(device_backend, special, classes):
    """An inf or NaN in one sample's sum of grad_out * x reaches only its label's row of
    grad_weight: every other row stays finite and matches the reference (a 0/1 mask multiplied
    in, or a one-hot product, would give 0 * inf = NaN there). 70 classes take the many-class
    paths (the CUDA tiled kernel, the Triton logits and gather on tl.dot); 20 samples span two
    of the Triton gather's sample steps."""
    device, backend = device_backend
    n, k = 20, 40
    for dtype in dtypes_for(backend):
        x, weight, bias, label = _inputs(n, k, 3, 3, classes, dtype, device)
        gen = torch.Generator().manual_seed(7)
        g = torch.randn(x.shape, generator=gen).to(dtype)
        g[3, 5, 1, 1] = special  # sample 3, channel 5
        g = g.to(device)
        gl = torch.randn(n, classes, generator=gen).to(dtype).to(device)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        got = torch.autograd.grad(pyprune.cas(*leaves, label), leaves, (g, gl))[1]
        ref = [t.double().requires_grad_() for t in (x, weight, bias)]
        want = torch.autograd.grad(reference.cas(*ref, label), ref, (g.double(), gl.double()))[1]
        row = int(label[3])
        others = torch.arange(classes, device=device) != row
        assert got[others].isfinite().all()
        _close(got[others], want[others], dtype, scale=max(1.0, float(want[others].abs().max())) * 4)
        cell, want_cell = got[row, 5].double().cpu(), want[row, 5].cpu()
        assert (cell.isnan() and want_cell.isnan()) or cell == want_cell
        finite = torch.arange(k, device=device) != 5
        _close(got[row][finite], want[row][finite], dtype,
               scale=max(1.0, float(want[row][finite].abs().max())) * 4)


@pytest.mark.parametrize("train", [True, False], ids=["label", "argmax"])
def test_gradcheck_float64(device_backend, train):
    device, backend = device_backend
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no float64")
    x, weight, bias, label = _inputs(3, 4, 3, 5, 3, torch.float64, device, gap=0.01)
    label = label if train else None
    args = tuple(t.clone().requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w, b: pyprune.cas(a, w, b, label), args)


def test_backward_saves_no_extra_input_sized_tensor(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference saves what autograd saves")
    x, weight, bias, label = _inputs(4, 6, 5, 5, 3, torch.float32, device)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pyprune.cas(x, weight.requires_grad_(), bias, label)
    assert sorted(t.numel() for t in saved) == sorted([4, 4 * 6, 3 * 6, x.numel()])


def test_opcheck(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    fwd, bwd = _OPS[backend]
    x, weight, bias, label = _inputs(3, 6, 4, 5, 4, torch.float32, device)
    view = x.flatten(2)
    for b in (bias, None):
        for lab in (label, None):
            args = (view.clone().requires_grad_(), weight.clone().requires_grad_(),
                    None if b is None else b.clone().requires_grad_(), lab)
            torch.library.opcheck(fwd, args)
            out, logits, index, mean = fwd(view, weight, b, lab)
            torch.library.opcheck(bwd, (torch.randn_like(out), torch.randn_like(logits), view,
                                        weight, index, mean))


class _Block(torch.nn.Module):
    def __init__(self, cin, cout, classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(cout)
        self.cas = pyprune.nn.CAS(cout, classes)

    def forward(self, x, label=None):
        return self.cas(torch.relu(self.bn(self.conv(x))), label)


class _Net(torch.nn.Module):
    """ResNet-style stages, CAS after the last two (as in the CAS paper)."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.stage3 = _Block(8, 16, classes)
        self.stage4 = _Block(16, 32, classes)
        self.fc = torch.nn.Linear(32, classes)

    def forward(self, x, label=None):
        x, lg3 = self.stage3(torch.relu(self.stem(x)), label)
        x, lg4 = self.stage4(x, label)
        return self.fc(x.mean((2, 3))), [lg3, lg4]


def test_compile_fullgraph_model(device_backend):
    device, _ = device_backend
    torch.manual_seed(0)
    model = _Net().to(device)
    x = torch.randn(5, 3, 12, 12, device=device)
    y = torch.randint(4, (5,), device=device)

    def loss_fn(m):
        logits, cas_logits = m(x, y)
        return F.cross_entropy(logits, y) + pyprune.cas_loss(cas_logits, y)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = loss_fn(compiled)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.testing.assert_close(loss, loss_fn(model), rtol=1e-4, atol=1e-5)
    loss_fn(model).backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()
    out, _ = compiled(x)
    torch.testing.assert_close(out, model(x)[0], rtol=1e-4, atol=1e-5)


def test_strided_label_and_bias(device_backend):
    """label and bias of any strides (here every other element of a larger tensor)."""
    device, _ = device_backend
    x, weight, bias, label = _inputs(4, 6, 3, 5, 5, torch.float32, device)
    strided_bias = torch.stack([bias, -bias], 1)[:, 0]
    strided_label = torch.stack([label, (label + 1) % 5], 1)[:, 0]
    assert strided_bias.stride() == (2,) and strided_label.stride() == (2,)
    for lab in (strided_label, None):
        got = pyprune.cas(x, weight, strided_bias, lab)
        want = _expected(x, weight, bias, None if lab is None else label)
        for g, w in zip(got, want):
            _close(g, w, torch.float32)


def test_compiled_graph_checks_label_range(device_backend):
    """Under torch.compile the labels are checked too (a ValueError from the kernel or the op,
    or a RuntimeError from the graph's asynchronous assert), not used to index out of range."""
    device, backend = device_backend
    if device == "cuda":  # cuda: the kernel's assert; triton: torch._assert_async on its flag
        pytest.skip("on CUDA the compiled check is a device assert, which ends the process's context")
    x, weight, bias, _ = _inputs(2, 3, 4, 4, 5, torch.float32, device)
    torch._dynamo.reset()
    f = torch.compile(lambda x, lab: pyprune.cas(x, weight, bias, lab)[0], fullgraph=True)
    good = torch.tensor([0, 4], device=device)
    _close(f(x, good), _expected(x, weight, bias, good)[0], torch.float32)
    for bad in ([0, 5], [-1, 0]):
        with pytest.raises((ValueError, RuntimeError), match=r"label values must be in \[0, 5\)"):
            f(x, torch.tensor(bad, device=device))


def test_empty_batch(device_backend):
    device, _ = device_backend
    x = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    weight = torch.randn(3, 4, device=device, requires_grad=True)
    for label in (torch.zeros(0, dtype=torch.int64, device=device), None):
        out, logits = pyprune.cas(x, weight, None, label)
        assert out.shape == x.shape and logits.shape == (0, 3)
        (out.sum() + logits.sum()).backward()
        assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_module():
    torch.manual_seed(0)
    m = pyprune.nn.CAS(6, 4)
    assert m.weight.shape == (4, 6) and m.bias.shape == (4,)
    assert "in_channels=6, num_classes=4" in repr(m)
    x = torch.randn(3, 6, 5, 5)
    label = torch.tensor([0, 3, 1])
    out, logits = m(x, label)
    want_out, want_logits = reference.cas(x, m.weight, m.bias, label)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(logits, want_logits)
    with pytest.raises(ValueError, match="training mode needs the labels"):
        m(x)
    m.eval()
    out, _ = m(x, label)  # eval: the predicted class, the label is ignored
    torch.testing.assert_close(out, reference.cas(x, m.weight, m.bias)[0])
    with pytest.raises(ValueError, match="must be >= 1"):
        pyprune.nn.CAS(0, 3)


# Bad input: a clear error naming the argument, before any kernel runs.
def _bad_cases(device="cpu"):
    def t(*args, **kwargs):
        return torch.tensor(*args, **kwargs, device=device)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    x = randn(2, 3, 4, 4)
    w = randn(5, 3)
    lab = t([0, 4])
    return [
        ((randn(2, 3, 16), w), {}, ValueError, "x must be 4-D"),
        (([1.0], w), {}, TypeError, "x must be a torch.Tensor"),
        ((x.long(), w), {}, TypeError, "x must have a floating dtype"),
        ((x, randn(5, 4)), {}, ValueError, r"weight must have shape \(num_classes >= 1, 3\)"),
        ((x, randn(5, 3, 1)), {}, ValueError, "weight must be 2-D"),
        ((x, randn(0, 3)), {}, ValueError, "weight must have shape"),
        ((x, w.double()), {}, TypeError, "weight must have x's dtype"),
        ((x, w), dict(bias=randn(4)), ValueError, r"bias must have shape \(5,\)"),
        ((x, w), dict(bias=randn(5).double()), TypeError, "bias must have x's dtype"),
        ((x, w), dict(label=t([0, 1, 2])), ValueError, r"label must have shape \(2,\)"),
        ((x, w), dict(label=lab.int()), TypeError, "label must be an int64"),
        ((x, w), dict(label=lab.float()), TypeError, "label must be an int64"),
        ((x, w), dict(label=[0, 1]), TypeError, "label must be a torch.Tensor"),
        ((x, w), dict(label=t([0, 5])), ValueError, r"label values must be in \[0, 5\), got 5"),
        ((x, w), dict(label=t([-1, 0])), ValueError, r"label values must be in \[0, 5\), got -1"),
        ((randn(2, 3, 0, 4), w), {}, ValueError, "one spatial element"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(device_backend, case):
    device, backend = device_backend
    args, kwargs, error, message = _bad_cases(device)[case]
    if device == "cuda" and message.startswith("label values"):
        # Every backend checks the range on the device there (the host never reads the
        # labels): a device assert, which ends the process's CUDA context.
        pytest.skip("on CUDA a label out of range is a device assert, which ends the context")
    with pytest.raises(error, match=message):
        pyprune.cas(*args, **kwargs)


def test_kernel_checks_labels_itself():
    """Direct torch.ops calls (and compiled graphs, which skip the Python range check) are
    checked by the CPU kernel."""
    x = torch.randn(2, 3, 16)
    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 5\)"):
        torch.ops.pyprune.cas(x, w, None, torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match=r"weight must have shape"):
        torch.ops.pyprune.cas(x, torch.randn(5, 4), None, None)


def _check_repeatable_grads(leaves: list[torch.Tensor], label, dtype) -> None:
    """The gradients of pyprune.cas(*leaves, label) (x, weight, bias leaves) for random output
    and logit gradients: bitwise equal on a second call (fixed-order sums, no atomics) and close
    to the float64 reference's."""
    x = leaves[0]
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(x.shape, generator=gen).to(dtype).to(x.device)
    gl = torch.randn(x.shape[0], leaves[1].shape[0], generator=gen).to(dtype).to(x.device)
    got = [torch.autograd.grad(pyprune.cas(*leaves, label), leaves, (g, gl)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*got))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.cas(*ref, label), ref, (g.double(), gl.double()))
    for name, a, b in zip(("x", "weight", "bias"), got[0], want):
        assert a.dtype == dtype, name
        _close(a, b, dtype, scale=max(1.0, float(b.abs().max())) * 4)


# The CUDA kernel's launch shapes (csrc/cuda/cas.cu): one sample over many blocks, a batch of 256,
# rows split into chunks (L = 192 over 128-wide chunks), a channel row that allows no 16-byte
# access (L = 49), the logits split over blocks with a separate argmax (130 classes, few
# samples: 3, a partial group of 4 in half types; float32 logits by a GEMM; in backward
# grad_logits.T @ mean as a GEMM, not in the gather), more samples than a
# gather block stages at once (300 > 256), each contiguous and channels_last (16-byte channel
# vectors when K % 8 == 0).
CUDA_SHAPES = [
    (1, 512, 7, 7, 10),
    (256, 64, 4, 4, 10),
    (2, 8, 16, 12, 5),
    (3, 24, 8, 8, 130),
    (300, 16, 2, 2, 7),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["label", "argmax"])
def test_cuda_launch_shapes(shape, layout, train):
    with pyprune.use_backend("cuda"):
        for dtype in dtypes_for("cuda"):
            x, weight, bias, label = _inputs(*shape, dtype, "cuda", gap=0.05)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            label = label if train else None
            out, logits = pyprune.cas(x, weight, bias, label)
            want_out, want_logits = _expected(x, weight, bias, label)
            torch.testing.assert_close(out, want_out, atol=0, rtol=0)
            _close(logits, want_logits, dtype, scale=10)
            # Run twice: the sums have a fixed order, so the results are bitwise equal.
            again = pyprune.cas(x, weight, bias, label)
            assert torch.equal(again[0], out) and torch.equal(again[1], logits)

            _check_repeatable_grads([t.clone().requires_grad_() for t in (x, weight, bias)],
                                    label, dtype)
            if shape[-1] > 64 and train:
                # Many classes: float32 logits by a GEMM over the stored means (addmm, or mm
                # without a bias), half types 4 samples a block; both without a bias too (with
                # a label: the inputs' top-2 gap holds with the bias only).
                out, logits = pyprune.cas(x, weight, None, label)
                want_out, want_logits = _expected(x, weight, None, label)
                torch.testing.assert_close(out, want_out, atol=0, rtol=0)
                _close(logits, want_logits, dtype, scale=10)


# The Triton kernels' split shapes (triton_kernels/cas.py): one sample over many programs, with
# several chunks of L and several channel blocks; channels_last with channel blocks and many
# position chunks (more than a logits step takes, BLOCK_S = 4); up to 64 classes the logits in
# each sample's last program (64: every class of its weight tile), more than 64 a logits launch
# (blocks of 16 samples and 16 classes) and the separate argmax kernel; channels beyond one
# logits step; a 7x7 map (no 16-byte rows); samples over several blocks of the logits and of
# grad_weight's gather. (N, K, H, W, classes, layout)
TRITON_SPLITS = [
    (1, 24, 20, 20, 5, "contiguous"),
    (2, 300, 3, 3, 7, "channels_last"),
    (1, 8, 40, 40, 3, "channels_last"),
    (1, 2, 66, 66, 3, "contiguous"),
    (3, 24, 8, 8, 130, "contiguous"),
    (2, 600, 2, 2, 3, "contiguous"),
    (5, 40, 7, 7, 3, "channels_last"),
    (20, 40, 5, 5, 70, "contiguous"),
    (3, 40, 9, 9, 64, "contiguous"),
]
TRITON_DEVICES = [p for p in DEVICE_BACKENDS if p.values[0][1] == "triton"]


@pytest.mark.parametrize("device_backend", TRITON_DEVICES, indirect=True)
@pytest.mark.parametrize("shape", TRITON_SPLITS, ids=str)
@pytest.mark.parametrize("wide", [True, False], ids=["wide-tail", "tail"])
def test_triton_split_shapes(device_backend, monkeypatch, shape, wide):
    """Against the float64 reference in both modes, forward and backward, and bitwise equal on a
    second call (fixed-order partial sums, no float atomics); the logits tail on the streaming
    tile's half (as larger grids run it) in every dtype, and on the wide weight tile of a
    one-wave grid (these grids are) in one dtype a shape, the dtypes in turn (the tails differ
    in the weight tile, not in how they load x)."""
    from pyprune.triton_kernels import cas as kernels

    if wide and shape[4] > kernels._FUSED_CLASSES:
        pytest.skip("more classes than the stream's tail forms: a logits launch, no tail")
    device, _ = device_backend
    monkeypatch.setattr(kernels, "_ONE_WAVE", 2**31 if wide else 0)
    *size, layout = shape
    n, k, h, w, classes = size
    view = torch.empty(n, k, h * w)
    if layout == "channels_last":
        view = view.transpose(1, 2).contiguous().transpose(1, 2)
    cl = kernels._channels_last(view, view)
    assert cl == (layout == "channels_last")
    block_k, block_l, _ = kernels._stream_config(n, k, h * w, cl)
    _, k_blocks, chunks = kernels._stream_grid(n, k, h * w, block_k, block_l)
    assert k_blocks * chunks > 1  # the sample is split over programs
    dtypes = dtypes_for("triton")
    if wide:
        dtypes = [dtypes[TRITON_SPLITS.index(shape) % len(dtypes)]]
    for dtype in dtypes:
        x, weight, bias, label = _inputs(*size, dtype, device, gap=0.05)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for lab in (label, None):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            out, logits = pyprune.cas(*leaves, lab)
            want_out, want_logits = _expected(x, weight, bias, lab)
            torch.testing.assert_close(out, want_out, atol=0, rtol=0)
            _close(logits, want_logits, dtype, scale=10)
            again = pyprune.cas(x, weight, bias, lab)
            assert torch.equal(again[0], out) and torch.equal(again[1], logits)

            _check_repeatable_grads(leaves, lab, dtype)


@pytest.mark.parametrize("device_backend", TRITON_DEVICES, indirect=True)
def test_triton_kernels_flag_bad_labels(device_backend):
    """The Triton launcher checks the labels on its own (a direct call, as a compiled graph
    makes, skips the op's host check): the kernels flag a label outside [0, C) and one
    asynchronous assert fails on the flag; the sample's weight row is never read. Each
    sample spans several programs: with few classes the flag is set by the last sample to
    finish where no sample marked a bad label (its first, middle or last), with many (70) set
    by program 0 and cleared by the logits launch."""
    from pyprune.triton_kernels import cas as kernels

    device, _ = device_backend
    if device == "cuda":
        pytest.skip("on CUDA the failed assert is a device assert, which ends the context")
    x, weight, bias, label = _inputs(3, 24, 20, 20, 5, torch.float32, device)
    view = x.flatten(2)
    out, logits, index, _ = kernels.cas_forward(view, weight, bias, label)
    want_out, want_logits = _expected(x, weight, bias, label)
    torch.testing.assert_close(out.view_as(x), want_out, atol=0, rtol=0)
    assert torch.equal(index, label)
    for bad in ([5, 0, 1], [0, 5, 1], [2, 0, -1], [7, 7, 7]):
        with pytest.raises(RuntimeError, match=r"label values must be in \[0, 5\)"):
            kernels.cas_forward(view, weight, bias, torch.tensor(bad, device=device))
    # A good call after a bad one starts from a fresh flag, and from counts left zero
    # (triton_kernels/_counters: kept between launches, no fill).
    from pyprune.triton_kernels import _counters

    assert all(not b.any() for b in _counters._BUFFERS.values())
    out, _, _, _ = kernels.cas_forward(view, weight, bias, label)
    torch.testing.assert_close(out.view_as(x), want_out, atol=0, rtol=0)
    _, _, index, _ = kernels.cas_forward(view, weight, bias, None)  # inference: counts too
    assert torch.equal(index, want_logits.argmax(1))
    assert all(not b.any() for b in _counters._BUFFERS.values())
    x, weight, bias, label = _inputs(3, 24, 20, 20, 70, torch.float32, device)
    view = x.flatten(2)
    kernels.cas_forward(view, weight, bias, label)
    for bad in ([70, 0, 1], [2, 0, -1]):
        with pytest.raises(RuntimeError, match=r"label values must be in \[0, 70\)"):
            kernels.cas_forward(view, weight, bias, torch.tensor(bad, device=device))


@pytest.mark.parametrize("device_backend", TRITON_DEVICES, indirect=True)
def test_triton_one_wave_grid_takes_the_wide_tail(device_backend, monkeypatch):
    """A streaming grid whose warps fit the GPU at once forms the logits on the wide weight tile
    (_WIDE_TAIL elements a step), a larger one on half the streaming tile; both against the
    reference."""
    from pyprune.triton_kernels import cas as kernels

    device, _ = device_backend
    spy = LaunchSpy(kernels._cas_stream_kernel)
    monkeypatch.setattr(kernels, "_cas_stream_kernel", spy)
    x, weight, bias, label = _inputs(2, 48, 4, 4, 10, torch.float32, device, gap=0.05)
    for one_wave in (kernels._ONE_WAVE, 0):  # 0: as if the grid were larger
        monkeypatch.setattr(kernels, "_ONE_WAVE", one_wave)
        out, logits = pyprune.cas(x, weight, bias, label)
        want_out, want_logits = _expected(x, weight, bias, label)
        torch.testing.assert_close(out, want_out, atol=0, rtol=0)
        _close(logits, want_logits, torch.float32, scale=10)
        launch = spy.launches[-1]
        tile = launch["BLOCK_K"] * launch["BLOCK_L"]
        assert launch["TAIL_C"] * launch["LOGIT_K"] == (kernels._WIDE_TAIL if one_wave
                                                        else tile // 2)


@pytest.mark.triton
def test_triton_grids_fill_the_gpu():
    """The streaming grids have >= 2 * 132 programs whenever tiles of 512 elements allow it, at
    every batch size of the benchmark shapes, in both layouts."""
    from pyprune.triton_kernels import cas as kernels

    for k, l in [(64, 1024), (128, 256), (256, 64), (512, 16), (2048, 49)]:
        for n in (1, 2, 8, 32, 128, 256):
            for cl in (False, True):
                block_k, block_l, warps = kernels._stream_config(n, k, l, cl)
                programs, _, _ = kernels._stream_grid(n, k, l, block_k, block_l)
                assert block_k * block_l == warps * 256
                if n * k * l >= 2 * 132 * 512:
                    assert programs >= 2 * 132, (n, k, l, cl)
                assert (block_l if not cl else block_k) >= min(16, l if not cl else k)
