"""Property-based fuzzing of every op on every backend of this machine against pyprune.reference.

Hypothesis draws shapes (size-0 and size-1 dims, odd sizes, odd and large groups), memory
layouts (contiguous, permuted, sliced with steps, expanded zero-stride, storage offset,
channels_last), values (ties, +0/-0, +-inf, NaN, subnormals, huge, mixed) and every dtype of the
backend. Selections (kwta, magnitude_mask) must be exact; arithmetic results are compared with
the float64 reference within a dtype tolerance scaled by the magnitude of the summed terms;
random ops (sap, gaussian_noise) are checked on properties that hold for every draw.

Bounded for CI: the profile below caps the examples per test (fewer under the Triton
interpreter) and is derandomized when the environment variable CI is set.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyprune
from pyprune import _backend, reference

from .conftest import TOLERANCES, dtypes_for

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

settings.register_profile(
    "pyprune-fuzz",
    # PYPRUNE_FUZZ_EXAMPLES=<n> fuzzes deeper than CI does.
    max_examples=int(os.environ.get("PYPRUNE_FUZZ_EXAMPLES", 12 if TRITON_INTERPRET else 30)),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
FUZZ = settings.get_profile("pyprune-fuzz")


def _backend_param(name: str):
    marks = [pytest.mark.triton] if name == "triton" else []
    reason = _backend.unavailable_reason(name, "cpu")
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(name, marks=marks, id=name)


# Every backend that runs CPU tensors (triton only under TRITON_INTERPRET=1).
BACKENDS = [_backend_param(name) for name in ("reference", "cpu", "triton")]

# Element budget per tensor: the Triton interpreter runs a kernel program by program in Python.
MAX_NUMEL = 600 if TRITON_INTERPRET else 4096


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

DIM_SIZES = [0, 1, 1, 2, 3, 4, 5, 7, 8, 16, 17, 33]
VALUE_KINDS = ["normal", "ties", "special", "mixed"]
LAYOUTS = ["contiguous", "permuted", "sliced", "expanded", "offset", "channels_last"]


@st.composite
def shapes(draw, min_dim=2, max_dim=4, max_numel=None, allow_zero=True):
    max_numel = max_numel or MAX_NUMEL
    rank = draw(st.integers(min_dim, max_dim))
    sizes = DIM_SIZES if allow_zero else [s for s in DIM_SIZES if s]
    shape = [draw(st.sampled_from(sizes)) for _ in range(rank)]
    while math.prod(shape) > max_numel:  # shrink the largest dim until it fits
        i = max(range(rank), key=lambda d: shape[d])
        shape[i] = max(1, shape[i] // 2)
    return tuple(shape)


def _values(shape, dtype, kind, seed, huge):
    """Values of a kind, made in float64 and rounded once to dtype."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    if kind == "ties":  # few distinct values, zeros of both signs
        x = torch.randint(-3, 4, (numel,), generator=gen).double()
        x = torch.where(torch.rand(numel, generator=gen) < 0.2, -x, x) * 0.5
        x = torch.where(x == 0, torch.where(torch.rand(numel, generator=gen) < 0.5, 0.0, -0.0), x)
    if kind in ("special", "mixed"):
        specials = torch.tensor(
            [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 1e-310, huge, -huge, 1.0, 1.0]
        )
        rate = 0.3 if kind == "special" else 0.05
        pick = torch.rand(numel, generator=gen) < rate
        which = torch.randint(len(specials), (numel,), generator=gen)
        x = torch.where(pick, specials.double()[which], x)
    if kind == "mixed":  # magnitudes spread over many decades
        x = x * torch.pow(10.0, torch.randint(-6, 7, (numel,), generator=gen).double())
    return x.view(shape).to(dtype)


def _layout(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """x's values in another memory layout (same shape, same values)."""
    if x.dim() == 0:
        return x.clone()
    if layout == "permuted":  # a random permutation of the dims in memory
        perm = torch.randperm(x.dim(), generator=gen).tolist()
        inverse = [perm.index(d) for d in range(x.dim())]
        return x.permute(perm).contiguous().permute(inverse)
    if layout == "sliced":  # every other element of a twice larger tensor along one dim
        d = int(torch.randint(x.dim(), (1,), generator=gen))
        big_shape = list(x.shape)
        big_shape[d] *= 2
        big = torch.full(big_shape, 7.0, dtype=x.dtype)
        index = [slice(None)] * x.dim()
        index[d] = slice(1, None, 2)
        big[tuple(index)] = x
        return big[tuple(index)]
    if layout == "offset":  # a view into a larger flat storage, not at its start
        offset = int(torch.randint(1, 9, (1,), generator=gen))
        flat = torch.full((x.numel() + offset + 3,), -5.0, dtype=x.dtype)
        flat[offset:offset + x.numel()] = x.reshape(-1)
        return flat.as_strided(x.shape, x.contiguous().stride(), offset)
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _expanded(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A zero-stride tensor of x's shape: one slice of x along a dim > 1, expanded."""
    dims = [d for d in range(x.dim()) if x.shape[d] > 1]
    if not dims:
        return x
    d = dims[int(torch.randint(len(dims), (1,), generator=gen))]
    return x.narrow(d, 0, 1).expand(x.shape)


@st.composite
def tensors(draw, shape, dtype, huge=1e38, layouts=LAYOUTS, kinds=VALUE_KINDS):
    """A tensor of a given shape and dtype with drawn values and memory layout."""
    kind = draw(st.sampled_from(kinds))
    layout = draw(st.sampled_from(layouts))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed ^ 0x5EED)
    x = _values(shape, dtype, kind, seed, huge)
    if layout == "expanded":
        return _expanded(x, gen)
    return _layout(x, layout, gen)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _bitwise_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN at the same places, the sign of zero included."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (
        got.shape, expected.shape, got.dtype, expected.dtype)
    nan = got.isnan()
    assert torch.equal(nan, expected.isnan()), "NaN positions differ"
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0)), "values differ"
    assert torch.equal(got.signbit() & ~nan, expected.signbit() & ~nan), "signs of zero differ"


def _close(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, rtol: float | None = None, name: str = "",
           any_nonfinite: bool = False) -> None:
    """got (in dtype) against the float64 expected: non-finite values of expected rounded to
    dtype must match exactly (NaN with NaN, inf with inf of the same sign); finite ones within
    atol + rtol * scale, scale being the magnitude of the summed terms (default |expected|).
    With any_nonfinite, an inf or NaN in expected needs only an inf or NaN in got."""
    dtype = dtype or got.dtype
    atol, rt = TOLERANCES[dtype]
    rt = rtol if rtol is not None else rt
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    g = got.detach().double()
    e = expected.detach().double()
    e_cast = e.to(dtype).double()
    special = ~e_cast.isfinite()
    if any_nonfinite:  # inf or NaN for inf or NaN: sums of infinities depend on the formula
        assert torch.equal(~g.isfinite(), special), f"{name}: non-finite positions differ"
    else:
        torch.testing.assert_close(g[special], e_cast[special], equal_nan=True, atol=0, rtol=0,
                                   msg=lambda m: f"{name}: non-finite values differ\n{m}")
    s = (e.abs() if scale is None else scale.detach().double().abs()).expand_as(e)
    err = (g - e).abs()
    bad = ~special & ~(err <= atol + rt * s)
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {e.numel()} elements differ; first at {i}: got "
            f"{g[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r} (scale {s[tuple(i)].item()!r}, "
            f"dtype {dtype})")


def _grad_of(x: torch.Tensor) -> torch.Tensor:
    g = x.grad
    return torch.zeros_like(x) if g is None else g


def _upstream(shape, dtype, seed: int = 0) -> torch.Tensor:
    """The gradient fed to backward: fixed for a shape, so a failing example replays."""
    gen = torch.Generator().manual_seed(hash(tuple(shape)) % 2**31 + seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def _mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


# ---------------------------------------------------------------------------------------------
# k-WTA and magnitude_mask: exact selections
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_kwta(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    mode = data.draw(st.sampled_from(["sample", "channel"]), label="mode")
    absolute = data.draw(st.booleans(), label="absolute")
    big = not TRITON_INTERPRET and data.draw(st.integers(0, 9), label="big") == 0
    if big:  # one group larger than 65536 elements: split across threads on the CPU
        shape = data.draw(st.sampled_from([(2, 70001), (1, 3, 1 << 15 | 7)]), label="shape")
        mode = "sample"
    else:
        shape = data.draw(shapes(min_dim=3 if mode == "channel" else 2), label="shape")
    x = data.draw(tensors(shape, dtype), label="x")
    group = math.prod(shape[1 if mode == "sample" else 2:])
    with pyprune.use_backend(backend):
        if group == 0:
            with pytest.raises(ValueError, match="empty"):
                pyprune.kwta(x, k=1, mode=mode, absolute=absolute)
            return
        use_ratio = data.draw(st.booleans(), label="use_ratio")
        if use_ratio:
            ratio = data.draw(st.floats(1.0 / group, 1.0), label="ratio")
            k = int(ratio * group)
            if k < 1:  # 1/group rounding below 1 in binary
                return
            got_k = dict(ratio=ratio)
        else:
            k = data.draw(st.integers(1, group), label="k")
            got_k = dict(k=k)
        leaf = x.detach().requires_grad_()
        out = pyprune.kwta(leaf, mode=mode, absolute=absolute, **got_k)
        assert out.shape == x.shape
        if shape[0] == 0:
            assert out.numel() == 0
            return
        keep = reference.kwta_mask(x.double(), k, mode, absolute)
        _bitwise_equal(out.detach(), _mask(x, keep))
        g = _upstream(shape, dtype)
        out.backward(g)
        _bitwise_equal(_grad_of(leaf), _mask(g, keep))


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_magnitude_mask(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    shape = data.draw(shapes(min_dim=1, max_dim=4), label="shape")
    w = data.draw(tensors(shape, dtype), label="w")
    keep_ratio = data.draw(st.floats(1e-3, 1.0), label="keep_ratio")
    k = int(keep_ratio * w.numel())
    with pyprune.use_backend(backend):
        if w.numel() == 0:
            with pytest.raises(ValueError, match="w is empty"):
                pyprune.magnitude_mask(w, keep_ratio)
            return
        got = pyprune.magnitude_mask(w, keep_ratio)
    assert got.dtype == torch.bool and got.shape == w.shape
    if k == 0:  # keep_ratio < 1 / numel keeps nothing
        assert not bool(got.any())
        return
    assert torch.equal(got, reference.magnitude_mask(w.double(), keep_ratio))


# ---------------------------------------------------------------------------------------------
# SAP: properties of every draw
# ---------------------------------------------------------------------------------------------

SAP_RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
@FUZZ
@given(data=st.data())
def test_sap(backend, exact, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    shape = data.draw(shapes(min_dim=2, max_dim=4), label="shape")
    # Finite values stay far enough below the dtype's max that a sample's sum of |x| stays
    # finite in float32 (at the reference's accumulation precision); inf and NaN are drawn.
    x = data.draw(tensors(shape, dtype, huge=1e30), label="x")
    group = math.prod(shape[1:])
    seed = data.draw(st.integers(0, 2**62), label="seed")
    with pyprune.use_backend(backend):
        if group == 0:
            with pytest.raises(ValueError, match="empty"):
                pyprune.sap(x, 1.0, exact=exact)
            return
        if data.draw(st.booleans(), label="use_samples"):
            r = data.draw(st.integers(1, 3 * group + 5), label="samples")
            kw = dict(samples=r)
        else:
            ratio = data.draw(st.floats(1.0 / group, 3.0), label="ratio")
            r = int(ratio * group)
            if r < 1:
                return
            kw = dict(ratio=ratio)
        leaf = x.detach().requires_grad_()
        out = pyprune.sap(leaf, exact=exact, generator=torch.Generator().manual_seed(seed), **kw)
        again = pyprune.sap(x, exact=exact, generator=torch.Generator().manual_seed(seed), **kw)
        assert out.shape == x.shape and out.dtype == x.dtype
        _bitwise_equal(again, out.detach())  # one seed, one output
        if shape[0] == 0:
            assert out.numel() == 0
            return
        g = _upstream(shape, dtype)
        out.backward(g)
    got = out.detach().flatten(1).double()
    grad = _grad_of(leaf).flatten(1).double()
    xf = x.flatten(1).double()
    gf = g.flatten(1).double()
    finite = xf.isfinite().all(dim=1)
    # A sample with a NaN or inf keeps nothing: x * 0, and a zero gradient.
    _close(got[~finite], (xf * 0)[~finite], dtype=dtype, name="non-finite sample")
    _close(grad[~finite], torch.zeros_like(grad[~finite]), dtype=dtype, name="grad, non-finite sample")
    got, grad, xf, gf = got[finite], grad[finite], xf[finite], gf[finite]
    q = reference.sap_keep_probability(xf, r)
    kept = got != 0
    assert not bool((kept & (xf == 0)).any()), "a zero element was kept"
    if exact:
        assert bool((kept.sum(dim=1) <= r).all()), f"more than r={r} elements kept"
    rtol = SAP_RTOL[dtype]
    expected = torch.where(kept, xf / q, torch.zeros_like(xf))
    _close(got, expected, dtype=dtype, rtol=rtol, name="out = x / q where kept")
    expected_grad = torch.where(kept, gf / q, torch.zeros_like(gf))
    _close(grad, expected_grad, dtype=dtype, rtol=rtol, name="grad = g * kept / q")


# ---------------------------------------------------------------------------------------------
# Gaussian noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multiplicative", [False, True], ids=["additive", "multiplicative"])
@FUZZ
@given(data=st.data())
def test_gaussian_noise(backend, multiplicative, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    shape = data.draw(shapes(min_dim=0, max_dim=4), label="shape")
    x = data.draw(tensors(shape, dtype, kinds=["normal", "normal", "ties", "special"]), label="x")
    std = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 0.5, 1.0, 2.0]), label="std")
    seed = data.draw(st.integers(0, 2**62), label="seed")
    with pyprune.use_backend(backend):
        leaf = x.detach().requires_grad_()
        out = pyprune.gaussian_noise(leaf, std, multiplicative=multiplicative,
                                     generator=torch.Generator().manual_seed(seed))
        again = pyprune.gaussian_noise(x, std, multiplicative=multiplicative,
                                       generator=torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        _bitwise_equal(again, out.detach())
        if x.numel() == 0:
            return
        g = _upstream(shape, dtype)
        out.backward(g)
    got, xd, grad = out.detach().double(), x.double(), _grad_of(leaf).double()
    if std == 0.0:
        _close(got, xd, dtype=dtype, name="std=0 gives x")
    if not multiplicative:
        _close(grad, g.double(), dtype=dtype, name="additive grad = g")
        normal = xd.isfinite() & (xd.abs() < 10)
        d = (got - xd)[normal]
        if std > 0 and d.numel() >= 400 and dtype != torch.bfloat16:
            assert 0.7 * std < d.std().item() < 1.3 * std, (d.std().item(), std)
            assert abs(d.mean().item()) < 0.3 * std
        return
    # d/dx of x (1 + std n) = 1 + std n = out / x where x is finite and not tiny.
    ok = xd.isfinite() & (xd.abs() > 1e-3) & got.isfinite()
    factor = got[ok] / xd[ok]
    atol, rtol = TOLERANCES[dtype]
    _close(grad[ok], g.double()[ok] * factor, dtype=dtype,
           scale=(g.double()[ok] * factor).abs() + g.double()[ok].abs(), name="grad = g * out / x")


# ---------------------------------------------------------------------------------------------
# CAS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_cas(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    n, k, h, w = data.draw(shapes(min_dim=4, max_dim=4), label="shape")
    classes = data.draw(st.sampled_from([1, 2, 3, 10]), label="classes")
    # Finite values well inside float16's range: sums of products of values near a dtype's max
    # overflow or not depending on the order of summation.
    # In float16 and bfloat16 no magnitudes spread over 12 decades either: whether a sum of
    # such terms overflows there depends on the order of its terms.
    kinds = VALUE_KINDS if dtype in (torch.float32, torch.float64) else ["normal", "ties", "special"]
    x = data.draw(tensors((n, k, h, w), dtype, huge=30.0, kinds=kinds), label="x")
    weight = data.draw(tensors((classes, k), dtype, huge=30.0, kinds=kinds,
                               layouts=["contiguous", "permuted", "sliced", "offset", "expanded"]),
                       label="weight")
    bias = None
    if data.draw(st.booleans(), label="has_bias"):
        bias = data.draw(tensors((classes,), dtype, huge=30.0), label="bias")
    label = None
    if data.draw(st.booleans(), label="has_label"):
        label = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(n * 31 + k))
        if n > 1 and data.draw(st.booleans(), label="label_strided"):
            label = torch.stack([label, label], 1)[:, 1]
    with pyprune.use_backend(backend):
        if k == 0 or h * w == 0:
            with pytest.raises(ValueError, match="x must have at least one channel"):
                pyprune.cas(x, weight, bias, label)
            return
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        out, logits = pyprune.cas(leaves[0], leaves[1], leaves[2], label)
        assert out.shape == x.shape and logits.shape == (n, classes)
        assert out.dtype == dtype and logits.dtype == dtype
        if n == 0:
            return
        g_out = _upstream(x.shape, dtype)
        g_logits = _upstream((n, classes), dtype, 1)
        torch.autograd.backward([out, logits], [g_out, g_logits])

    d = [t.double() if t is not None else None for t in (x, weight, bias)]
    ref_logits = reference.cas(*d)[1]
    absd = [t.abs() if t is not None else None for t in d]
    scale_logits = reference.cas(*absd)[1]
    _close(logits, ref_logits, scale_logits, dtype=dtype, name="logits")
    if label is None:
        # The class the kernel chose: one whose reference logit is the maximum within the
        # tolerance (NaN counting as largest); out must be x * weight[that class].
        atol, rtol = TOLERANCES[dtype]
        chosen = []
        for i in range(n):
            row, srow = ref_logits[i], scale_logits[i]
            if bool(row.isnan().any()):
                candidates = row.isnan()
            else:
                top = row.max()
                candidates = row >= top - (atol + rtol * srow) if bool(top.isfinite()) else row == top
            match = None
            for c in candidates.nonzero().flatten().tolist():
                expected = (x[i].double() * weight[c].double()[:, None, None])
                e = expected.to(dtype).double()
                got = out[i].detach().double()
                if torch.allclose(got.nan_to_num(1e300, 1e301, -1e301),
                                  e.nan_to_num(1e300, 1e301, -1e301), atol=atol, rtol=rtol):
                    match = c
                    break
            assert match is not None, f"sample {i}: out is not x * weight[c] for any top class c"
            chosen.append(match)
        label = torch.tensor(chosen, dtype=torch.int64)
    d = [t.detach().requires_grad_() if t is not None else None for t in d]
    r_out, r_logits = reference.cas(*d, label=label)
    torch.autograd.backward([r_out, r_logits], [g_out.double(), g_logits.double()])
    a = [t.detach().abs().requires_grad_() if t is not None else None for t in d]
    s_out, s_logits = reference.cas(*a, label=label)
    torch.autograd.backward([s_out, s_logits], [g_out.double().abs(), g_logits.double().abs()])
    _close(out, r_out, s_out, dtype=dtype, name="out")
    for name, got_leaf, r, s in zip(("x", "weight", "bias"), leaves, d, a):
        if got_leaf is not None:
            _close(_grad_of(got_leaf), r.grad, s.grad, dtype=dtype, name=f"grad {name}",
                   any_nonfinite=True)


# ---------------------------------------------------------------------------------------------
# Masked convolution
# ---------------------------------------------------------------------------------------------


@st.composite
def conv_geometries(draw):
    """(n, c_in, c_out, h, w, kh, kw, stride, padding, dilation, groups)."""
    depthwise = draw(st.integers(0, 4)) == 0
    if depthwise:
        groups = draw(st.sampled_from([3, 5, 8, 16]))
        c_in, c_out = groups, groups * draw(st.sampled_from([1, 1, 2]))
    else:
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        c_in = groups * draw(st.integers(1, 4))
        c_out = groups * draw(st.integers(1, 4))
    n = draw(st.sampled_from([0, 1, 2, 3]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    spans = [dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1]
    h = max(1, spans[0] - 2 * padding[0] + draw(st.integers(0, 6)))
    w = max(1, spans[1] - 2 * padding[1] + draw(st.integers(0, 6)))
    if TRITON_INTERPRET:
        h, w = min(h, 7), min(w, 7)
        h, w = max(h, spans[0] - 2 * padding[0], 1), max(w, spans[1] - 2 * padding[1], 1)
    return n, c_in, c_out, h, w, kh, kw, stride, padding, dilation, groups


@st.composite
def channel_masks(draw, n, c, dtype):
    kind = draw(st.sampled_from(["none", "bool", "bool", "float"]))
    if kind == "none":
        return None
    per_sample = draw(st.booleans())
    shape = (n, c) if per_sample else (c,)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    fill = draw(st.sampled_from(["random", "all", "nothing"]))
    if kind == "bool":
        m = {"random": torch.rand(shape, generator=gen) < 0.5,
             "all": torch.ones(shape, dtype=torch.bool),
             "nothing": torch.zeros(shape, dtype=torch.bool)}[fill]
    else:
        m = {"random": torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5,
             "all": torch.ones(shape, dtype=torch.float64),
             "nothing": torch.zeros(shape, dtype=torch.float64)}[fill].to(dtype)
    layout = draw(st.sampled_from(["contiguous", "sliced", "expanded", "offset", "permuted"]))
    return _expanded(m, gen) if layout == "expanded" else _layout(m, layout, gen)


def _conv_reference(x, weight, bias, conv_args, masks, g, absolute=False, structural=True):
    """reference.masked_conv2d in float64 and its gradients for the upstream g (with absolute,
    of |every input| and |g|: the magnitude of the summed terms, for tolerances).

    A bool out_mask is structural: a masked-out output element takes no part in the backward
    either, so the gradients are summed over the kept (sample, output channel) pairs only, each
    from the kept samples and one weight row (the plain autograd of the reference would multiply
    the masked zeros of the upstream by inf or NaN in x or the weight and spread NaN)."""
    def leaf(t):
        if t is None or not t.is_floating_point():
            return t
        t = t.detach().double()
        return (t.abs() if absolute else t).requires_grad_()

    args = {"x": leaf(x), "weight": leaf(weight), "bias": leaf(bias)}
    lmasks = {k: leaf(v) for k, v in masks.items()}
    g = g.double().abs() if absolute else g.double()
    out = reference.masked_conv2d(args["x"], args["weight"], args["bias"], *conv_args, **lmasks)
    out_mask = masks["out_mask"]
    if out_mask is None or out_mask.dtype != torch.bool or not structural:
        out.backward(g)
    else:
        n, c_out = out.shape[:2]
        keep = out_mask.expand(n, c_out) if out_mask.dim() == 1 else out_mask
        rows = torch.arange(c_out)
        for c in range(c_out):
            samples = keep[:, c].nonzero().flatten()
            if samples.numel() == 0:
                continue

            def pick(m):
                return m if m is None or m.dim() != 2 else m.index_select(0, samples)

            w_c = torch.where((rows == c).view(-1, 1, 1, 1), args["weight"],
                              torch.zeros((), dtype=torch.float64))
            y = reference.masked_conv2d(
                args["x"].index_select(0, samples), w_c, args["bias"], *conv_args,
                in_mask=pick(lmasks["in_mask"]), weight_mask=lmasks["weight_mask"])
            (y[:, c] * g.index_select(0, samples)[:, c]).sum().backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v))
             for k, v in {**args, **lmasks}.items() if v is not None and v.is_floating_point()}
    return out.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_masked_conv2d(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    n, c_in, c_out, h, w, kh, kw, stride, padding, dilation, groups = data.draw(
        conv_geometries(), label="geometry")
    # Finite values well inside float16's range (see test_cas); inf and NaN are drawn, except
    # in bfloat16: torch's bfloat16 CPU convolution (F.conv2d, oneDNN) turns an inf input into
    # NaN and spreads it to outputs that do not read it (x = [[[[0.66, inf, 0.06]]]],
    # w = [[[[1.54, -0.29]]]], dilation (1, 2) gives NaN for 0.998).
    finite_only = dtype == torch.bfloat16
    x_kinds = (["normal", "ties"] if finite_only else VALUE_KINDS if dtype != torch.float16
               else ["normal", "ties", "special"])  # no 'mixed' in float16: see test_cas
    x = data.draw(tensors((n, c_in, h, w), dtype, huge=30.0, kinds=x_kinds), label="x")
    # inf in the weight only without padding: torch's conv engines differ on 0 * inf at the
    # zero padding (oneDNN skips padded taps, the float64 engine multiplies them into NaN).
    weight_kinds = ["normal", "normal", "ties"] + (
        ["special"] if padding == (0, 0) and not finite_only else [])
    weight = data.draw(tensors((c_out, c_in // groups, kh, kw), dtype, huge=30.0,
                               kinds=weight_kinds), label="weight")
    bias = data.draw(st.one_of(st.none(), tensors((c_out,), dtype, huge=30.0, layouts=LAYOUTS,
                                                  kinds=["normal", "ties"])), label="bias")
    in_mask = data.draw(channel_masks(n, c_in, dtype), label="in_mask")
    out_mask = data.draw(channel_masks(n, c_out, dtype), label="out_mask")
    weight_mask = None
    wm_kind = data.draw(st.sampled_from(["none", "none", "bool", "float"]), label="weight_mask")
    if wm_kind != "none":
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="wm_seed"))
        density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="wm_density")
        weight_mask = torch.rand(weight.shape, generator=gen) < density
        if wm_kind == "float":
            weight_mask = weight_mask.to(dtype) * torch.rand(weight.shape, generator=gen).to(dtype)
    conv_args = (stride, padding, dilation, groups)
    masks = dict(in_mask=in_mask, out_mask=out_mask, weight_mask=weight_mask)

    def leafify(t):
        if t is None or not t.is_floating_point():
            return t
        return t.detach().requires_grad_()

    with pyprune.use_backend(backend):
        lx, lw, lb = leafify(x), leafify(weight), leafify(bias)
        lmasks = {k: leafify(v) for k, v in masks.items()}
        out = pyprune.masked_conv2d(lx, lw, lb, *conv_args, **lmasks)
        expected_shape = reference.masked_conv2d(x.double()[:0], weight.double(), None,
                                                 *conv_args).shape[1:]
        assert out.shape == (n, *expected_shape), (out.shape, expected_shape)
        assert out.dtype == dtype
        if n == 0:
            return
        g = _upstream(out.shape, dtype)
        out.backward(g)

    r_out, r_grads = _conv_reference(x, weight, bias, conv_args, masks, g)
    _, plain_grads = _conv_reference(x, weight, bias, conv_args, masks, g, structural=False)
    s_out, s_grads = _conv_reference(x, weight, bias, conv_args, masks, g, absolute=True)
    _close(out, r_out, s_out, dtype=dtype, name="out")
    if out_mask is not None and out_mask.dtype == torch.bool:
        keep = out_mask.view(-1 if out_mask.dim() == 1 else n, *(() if out_mask.dim() == 1 else (-1,)))
        keep = keep.view(1, -1, 1, 1) if out_mask.dim() == 1 else keep.view(n, -1, 1, 1)
        masked = (~keep).expand_as(out)
        assert bool((out.detach()[masked] == 0).all()), "a masked-out output channel is not 0"
    leaves = {"x": lx, "weight": lw, "bias": lb, **lmasks}
    for name, got_leaf in leaves.items():
        if got_leaf is None or not got_leaf.is_floating_point():
            continue
        got = _grad_of(got_leaf)
        # Where a masked-out output meets inf or NaN, NaN as the reference's plain autograd
        # (0 * inf through the mask) is accepted as well as the structural value.
        both_nan = got.isnan() & plain_grads[name].isnan()
        got = torch.where(both_nan, r_grads[name].to(got.dtype), got)
        _close(got, r_grads[name], s_grads[name], dtype=dtype, name=f"grad {name}",
               any_nonfinite=True)


@pytest.mark.triton
@pytest.mark.skipif(_backend.unavailable_reason("triton", "cpu") is not None,
                    reason=str(_backend.unavailable_reason("triton", "cpu")))
def test_masked_conv2d_strided_bias_triton():
    """The kernel reads bias[c] at unit stride: a strided bias is made contiguous first."""
    x = torch.tensor([[[[1.541]]]])
    weight = torch.tensor([1.541, -0.2934]).view(2, 1, 1, 1)
    storage = torch.tensor([7.0, 1.541, 7.0, -0.2934])
    bias = storage[1::2]  # stride 2, storage offset 1
    with pyprune.use_backend("triton"):
        got = pyprune.masked_conv2d(x, weight, bias)
    expected = reference.masked_conv2d(x.double(), weight.double(), bias.double())
    _close(got, expected, name="out")
