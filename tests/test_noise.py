"""gaussian_noise and magnitude_mask on every backend (distribution, seeding, gradients,
opcheck, compile, bad input) and the weight wrappers NoisyWeight / MagnitudePruned."""
from __future__ import annotations

import math

import pytest
import torch

import pyprune
from pyprune import reference
from pyprune.ops.noise import _OPS

from .conftest import (TOLERANCES, TRITON_INTERPRET, assert_half_rounds_to_nearest,
                       compile_and_backward, dtypes_for)

Z = 5.0


def _n(device):
    return 1 << 12 if TRITON_INTERPRET else 1 << 18


@pytest.mark.parametrize("multiplicative", [False, True], ids=["additive", "multiplicative"])
def test_distribution(device_backend, multiplicative):
    """The noise n = (out - x) / std (or out / x - 1) has mean 0, variance 1, N(0,1) tails,
    and neighbouring values are uncorrelated."""
    device, backend = device_backend
    n = _n(device)
    dtype = torch.float64 if torch.float64 in dtypes_for(backend) else torch.float32
    x = torch.rand(n, device=device, dtype=dtype) + 0.5
    torch.manual_seed(0)
    std = 0.3
    out = pyprune.gaussian_noise(x, std, multiplicative=multiplicative)
    noise = (((out / x - 1) if multiplicative else (out - x)) / std).double()
    assert abs(noise.mean().item()) <= Z / math.sqrt(n)
    assert abs(noise.var().item() - 1) <= Z * math.sqrt(2 / n)
    tail = (noise.abs() > 2).double().mean().item()
    assert abs(tail - 0.0455) <= Z * math.sqrt(0.0455 / n)
    corr = (noise[1:] * noise[:-1]).mean().item()
    assert abs(corr) <= Z / math.sqrt(n)


def test_dtypes_layouts_and_shapes(device_backend):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        for x in (
            torch.randn(3, 4, 5, 7, device=device).to(dtype),
            torch.randn(2, 3, 4, 4, device=device).to(dtype).contiguous(memory_format=torch.channels_last),
            torch.randn(6, 5, 9, device=device).to(dtype)[::2].transpose(1, 2),
            torch.randn(7, device=device).to(dtype),
            torch.randn((), device=device).to(dtype),
        ):
            for mult in (False, True):
                out = pyprune.gaussian_noise(x, 0.0, multiplicative=mult)
                assert out.shape == x.shape and out.dtype == x.dtype
                torch.testing.assert_close(out, x, atol=0, rtol=0)
                out = pyprune.gaussian_noise(x, 0.5, multiplicative=mult)
                assert not torch.equal(out, x) and torch.isfinite(out).all()
    if backend != "reference":
        cl = torch.randn(2, 3, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
        assert pyprune.gaussian_noise(cl, 0.1).is_contiguous(memory_format=torch.channels_last)


def test_seeding(device_backend):
    device, _ = device_backend
    x = torch.randn(4, 300, device=device)
    a = pyprune.gaussian_noise(x, 1.0, generator=torch.Generator(device).manual_seed(3))
    b = pyprune.gaussian_noise(x, 1.0, generator=torch.Generator(device).manual_seed(3))
    c = pyprune.gaussian_noise(x, 1.0, generator=torch.Generator(device).manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    a = pyprune.gaussian_noise(x, 1.0)
    torch.manual_seed(5)
    assert torch.equal(a, pyprune.gaussian_noise(x, 1.0))


@pytest.mark.parametrize("multiplicative", [False, True])
def test_half_precision_output_rounds_to_nearest(device_backend, multiplicative):
    """A 16-bit result is the float32 computation rounded to nearest even, on every kernel
    backend (the same seed, inputs exact in the 16-bit type)."""
    if device_backend[1] == "reference":
        pytest.skip("the reference draws its noise in the input's dtype")
    assert_half_rounds_to_nearest(
        lambda x, gen: pyprune.gaussian_noise(x, 0.3, multiplicative=multiplicative,
                                              generator=gen), device_backend, (3, 1000), 8)


def _stream_inputs(device):
    """1-D views the kernels take on different paths: a tail of 1 to 3 values, a length that is a
    multiple of 16 (vector accesses), a view one element off 16-byte alignment (the CUDA kernel's
    element-wise path) and a strided view."""
    base = torch.randn(2 * 4096 + 1, device=device)
    return {"tail": base[:1001], "aligned": base[:4096], "unaligned": base[1:4097],
            "strided": base[: 2 * 1003 : 2]}


@pytest.mark.parametrize("case", ["tail", "aligned", "unaligned", "strided"])
def test_cpu_and_triton_share_the_stream(case):
    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter")
    x = _stream_inputs("cpu")[case]
    seed = torch.tensor([-5, 2**40 + 3])
    for mult in (False, True):
        a = torch.ops.pyprune.gaussian_noise(x, seed, 0.5, mult)
        b = torch.ops.pyprune.gaussian_noise_triton(x, seed, 0.5, mult)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["tail", "strided"])
def test_triton_int64_offsets_draw_the_same_values(case):
    """The kernel's int64-offset variant (launched where an offset reaches 2^31) gives the int32
    variant's values, and both stay within 1e-5 of the CPU's on a longer stream."""
    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter")
    from pyprune.triton_kernels import noise

    x = _stream_inputs("cpu")[case]
    seed = torch.tensor([123, -(2**50) - 7])
    for mult in (False, True):
        narrow = noise.gaussian_noise(x, seed, 0.7, mult, _wide=False)
        wide = noise.gaussian_noise(x, seed, 0.7, mult, _wide=True)
        assert torch.equal(narrow, wide)
    z = torch.zeros(1 << 16)
    got = noise.gaussian_noise(z, seed, 1.0, False)
    torch.testing.assert_close(got, torch.ops.pyprune.gaussian_noise(z, seed, 1.0, False),
                               rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", ["tail", "aligned", "unaligned", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_and_cuda_share_the_stream(case, dtype):
    """The CUDA kernel (vector and element-wise paths, approximate transcendentals) draws the CPU
    kernel's normals: equal up to the approximations (~1e-6 in n) and the dtype's rounding."""
    x = _stream_inputs("cuda")[case].to(dtype)
    seed = torch.tensor([-5, 2**40 + 3])
    atol, rtol = (1e-4, 1e-5) if dtype in (torch.float32, torch.float64) else TOLERANCES[dtype]
    for mult in (False, True):
        got = torch.ops.pyprune.gaussian_noise(x, seed.cuda(), 0.5, mult).cpu()
        want = torch.ops.pyprune.gaussian_noise(x.cpu(), seed, 0.5, mult)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("multiplicative", [False, True], ids=["additive", "multiplicative"])
def test_gradient(device_backend, multiplicative):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        atol, rtol = TOLERANCES[dtype]
        x = (torch.rand(3, 4, 5, device=device) + 0.5).to(dtype).requires_grad_()
        g = torch.randn_like(x)
        out = pyprune.gaussian_noise(x, 0.2, multiplicative=multiplicative)
        (got,) = torch.autograd.grad(out, x, g)
        want = g * (out.detach() / x.detach()) if multiplicative else g
        torch.testing.assert_close(got, want, atol=atol, rtol=max(rtol, 1e-4))


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no float64")
    x = torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True)
    for mult in (False, True):
        def fn(t, mult=mult):
            return pyprune.gaussian_noise(t, 0.3, multiplicative=mult,
                                          generator=torch.Generator(device).manual_seed(1))
        assert torch.autograd.gradcheck(fn, (x,))


def test_opcheck(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    seed = torch.tensor([11, 22], device=device)
    for mult in (False, True):
        x = torch.randn(37, device=device, requires_grad=True)
        torch.library.opcheck(_OPS[backend], (x, seed, 0.3, mult))


def test_compile_fullgraph_model(device_backend):
    device, _ = device_backend
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pyprune.nn.NoisyWeight(torch.nn.Conv2d(3, 4, 3, padding=1), std=0.05),
        pyprune.nn.GaussianNoise(0.1),
        torch.nn.ReLU(),
        pyprune.nn.NoisyWeight(torch.nn.Conv2d(4, 4, 3, padding=1), std=0.1, multiplicative=True),
        pyprune.nn.GaussianNoise(0.1, multiplicative=True),
        pyprune.nn.MagnitudePruned(torch.nn.Conv2d(4, 4, 3, padding=1), keep_ratio=0.5),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    assert compile_and_backward(model, x).shape == (2, 2)
    noise = torch.compile(pyprune.nn.GaussianNoise(0.5), fullgraph=True)
    z = torch.zeros(4096, device=device)
    assert abs(noise(z).std().item() - 0.5) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    x = torch.zeros(1 << 16, device="cuda")
    with pyprune.use_backend(backend):
        pyprune.gaussian_noise(x, 1.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = pyprune.gaussian_noise(x, 1.0)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert not torch.equal(first, y) and abs(y.std().item() - 1) < 0.05


# magnitude_mask

def test_magnitude_mask_matches_reference(device_backend):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        for shape in ((16, 3, 3, 3), (10, 7), (1001,)):
            w = torch.randn(shape, device=device).mul(4).round().to(dtype)  # many ties
            w.view(-1)[:3] = float("nan")
            for keep in (0.001, 0.1, 0.5, 0.99, 1.0):
                if int(keep * w.numel()) < 1:
                    continue
                got = pyprune.magnitude_mask(w, keep)
                want = reference.magnitude_mask(w.double(), keep)
                assert got.dtype == torch.bool and torch.equal(got, want), (dtype, shape, keep)
                assert got.sum() >= int(keep * w.numel())
        w = torch.randn(8, 8, device=device).to(dtype).contiguous().t()
        assert torch.equal(pyprune.magnitude_mask(w, 0.3), reference.magnitude_mask(w, 0.3))


def test_magnitude_mask_keeping_nothing(device_backend):
    """k = int(keep_ratio * numel) rounds to 0 for keep_ratio just under 1 / numel (1/49 of 49
    weights in floating point): an all-False mask, not an error."""
    device, _ = device_backend
    w = torch.randn(7, 7, device=device)
    for keep in (1 / 49, 0.01):
        assert int(keep * w.numel()) == 0
        got = pyprune.magnitude_mask(w, keep)
        assert got.dtype == torch.bool and got.shape == w.shape and not got.any()
    assert pyprune.magnitude_mask(w, 2 / 49).sum() == 1


def test_magnitude_mask_compiles_once(device_backend):
    """Under compile(dynamic=True) k follows the size symbolically: one graph for every size."""
    import torch._dynamo.testing

    device, _ = device_backend
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda w: pyprune.magnitude_mask(w, 0.3), backend=counter,
                             dynamic=True, fullgraph=True)
    for numel in (10, 49, 64, 100, 7):
        w = torch.randn(numel, device=device).mul(4).round()  # ties
        w[1] = float("nan")
        assert torch.equal(compiled(w), reference.magnitude_mask(w, 0.3))
        w = torch.randn(numel, 3, device=device)
        assert torch.equal(compiled(w), reference.magnitude_mask(w, 0.3))
    assert counter.frame_count == 2  # one graph per rank


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("padding", [1, "same", 0])
def test_magnitude_pruned_conv(monkeypatch, path, padding):
    """A pruned Conv2d runs as masked_conv2d with a bool weight mask (the sparse convolution or
    the dense engine): values and gradients as the masked weight in F.conv2d."""
    monkeypatch.setenv("PYPRUNE_SPARSE_CONV", path)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=padding, stride=1).double()
    x = torch.randn(3, 16, 12, 11, dtype=torch.float64, requires_grad=True)
    pruned = pyprune.nn.MagnitudePruned(conv, 0.1)
    with pyprune.use_backend("cpu"):
        got = pruned(x)
    mask = reference.magnitude_mask(conv.weight, 0.1)
    ref_w = conv.weight.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    want = torch.nn.functional.conv2d(ref_x, ref_w * mask, conv.bias, 1, padding)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    gx, gw = torch.autograd.grad(got, (x, conv.weight), grad)
    wx, ww = torch.autograd.grad(want, (ref_x, ref_w), grad)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)


def test_module_wrappers():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 5)
    pruned = pyprune.nn.MagnitudePruned(conv, 0.25)
    mask = reference.magnitude_mask(conv.weight, 0.25)
    want = torch.nn.functional.conv2d(x, conv.weight * mask, conv.bias)
    torch.testing.assert_close(pruned(x), want)
    pruned(x).sum().backward()
    assert (conv.weight.grad[~mask] == 0).all() and (conv.weight.grad[mask] != 0).any()
    assert "keep_ratio=0.25" in repr(pruned)
    noisy = pyprune.nn.NoisyWeight(conv, std=0.0)
    torch.testing.assert_close(noisy(x), conv(x))
    noisy = pyprune.nn.NoisyWeight(conv, std=0.1, multiplicative=True)
    assert not torch.equal(noisy(x), noisy(x))
    act = pyprune.nn.GaussianNoise(0.2, multiplicative=True)
    assert "std=0.2" in repr(act)
    with pytest.raises(TypeError, match="tensor attribute 'weight'"):
        pyprune.nn.NoisyWeight(torch.nn.ReLU(), std=0.1)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        pyprune.nn.MagnitudePruned(conv, 0.0)
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        pyprune.nn.GaussianNoise(-1.0)


BAD_NOISE = [
    (dict(std=-0.1), ValueError, "std must be a finite number >= 0"),
    (dict(std=float("inf")), ValueError, "std must be a finite number >= 0"),
    (dict(std=float("nan")), ValueError, "std must not be NaN"),
    (dict(std="0.1"), TypeError, "std must be a real number"),
    (dict(std=0.1, multiplicative=1), TypeError, "multiplicative must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_NOISE, ids=[str(b[0]) for b in BAD_NOISE])
def test_bad_noise_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        pyprune.gaussian_noise(torch.randn(2, 3), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pyprune.gaussian_noise(torch.ones(4, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="w must have a floating dtype"):
        pyprune.magnitude_mask(torch.ones(4, dtype=torch.int64), 0.5)
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="keep_ratio must be in"):
            pyprune.magnitude_mask(torch.randn(4, 4), keep)
    with pytest.raises(ValueError, match="w is empty"):
        pyprune.magnitude_mask(torch.randn(0, 4), 0.5)
    with pytest.raises(RuntimeError, match="std must be >= 0"):
        torch.ops.pyprune.gaussian_noise(torch.randn(3), torch.tensor([1, 2]), -1.0, False)


def test_multiplicative_nonfinite_with_zero_std(device_backend):
    """Multiplicative noise is x * (1 + std * n): with std = 0 every value comes back as it is,
    inf and NaN included (x + x * std * n would turn inf into NaN)."""
    device, backend = device_backend
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, 1.5, -2.0], device=device)
    out = pyprune.gaussian_noise(x, 0.0, multiplicative=True)
    assert torch.equal(out.nan_to_num(7.0), x.nan_to_num(7.0)) and out.isnan()[2]
