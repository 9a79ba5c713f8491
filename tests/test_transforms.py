"""Every op under PyTorch's transforms, against the reference: double backward (gradgradcheck),
forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad), torch.func.grad / jacrev,
vmap and vmap(grad). None may be silently wrong: each result is compared with the reference's
own autograd, and each must be nonzero where the reference's is."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import pyprune
from pyprune import reference

from .conftest import dtypes_for


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes_for(backend) else torch.float32


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _seeded(device, seed=0):
    return torch.Generator(device).manual_seed(seed)


def _cases(device: str, dtype: torch.dtype):
    """name -> (f, reference f, x): f and reference f map one tensor to one tensor; random ops
    use a freshly seeded generator per call (so f is a deterministic function), and their
    reference is the linear map that SPEC's gradient defines at x (the kept set and q, or the
    noise, constant)."""
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    x4 = rand(3, 4, 5, 5)
    weight, bias = rand(6, 4), rand(6)
    label = torch.tensor([1, 5, 0], device=device)
    # SAP's input: small, since jacrev and jacfwd make a call per element (the Triton
    # interpreter's bernoulli call takes seconds).
    pos = rand(2, 12).abs() + 0.25

    def sap(t, exact):
        return pyprune.sap(t, samples=8, exact=exact, generator=_seeded(device))

    def noise(t, multiplicative):
        return pyprune.gaussian_noise(t, 0.3, multiplicative=multiplicative,
                                      generator=_seeded(device))

    cw, cb = rand(6, 4, 3, 3), rand(6)
    out_mask = torch.tensor([True, False, True, True, False, True], device=device)
    sample_mask = torch.rand(3, 6, generator=gen).to(device) < 0.5
    weight_mask = (torch.rand(6, 4, 3, 3, generator=gen) < 0.1).to(device)
    soft_in, soft_out = rand(3, 4).sigmoid(), rand(3, 6).sigmoid()

    def conv(fn, **masks):
        return lambda t: fn(t, cw, cb, 1, 1, **masks) if fn is pyprune.masked_conv2d else fn(
            t, cw, cb, (1, 1), (1, 1), (1, 1), 1, masks.get("in_mask"), masks.get("out_mask"),
            masks.get("weight_mask"))

    sap_scale = {e: (sap(pos, e) / pos).detach() for e in (True, False)}
    noise_add = (noise(x4, False) - x4).detach()
    noise_mul = (noise(x4, True) / x4).detach()
    return {
        "kwta-sample": (lambda t: pyprune.kwta(t, 0.3), lambda t: reference.kwta(t, 30), x4),
        "kwta-channel-abs": (lambda t: pyprune.kwta(t, k=7, mode="channel", absolute=True),
                             lambda t: reference.kwta(t, 7, "channel", True), x4),
        "sap-exact": (lambda t: sap(t, True), lambda t: t * sap_scale[True], pos),
        "sap-bernoulli": (lambda t: sap(t, False), lambda t: t * sap_scale[False], pos),
        "noise-additive": (lambda t: noise(t, False), lambda t: t + noise_add, x4),
        "noise-multiplicative": (lambda t: noise(t, True), lambda t: t * noise_mul, x4),
        "cas-label": (lambda t: _cas_sum(pyprune.cas(t, weight, bias, label)),
                      lambda t: _cas_sum(reference.cas(t, weight, bias, label)), x4),
        "cas-argmax": (lambda t: _cas_sum(pyprune.cas(t, weight, None)),
                       lambda t: _cas_sum(reference.cas(t, weight, None)), x4),
        **{f"conv-{name}": (conv(pyprune.masked_conv2d, **masks),
                            conv(reference.masked_conv2d, **masks), x4)
           for name, masks in (("out-mask", dict(out_mask=out_mask)),
                               ("sample-mask", dict(out_mask=sample_mask)),
                               ("weight-mask", dict(weight_mask=weight_mask)),
                               ("soft-sample-masks", dict(in_mask=soft_in, out_mask=soft_out)))},
    }


def _cas_sum(pair):
    """CAS's two outputs as one tensor, so both reach every transform."""
    out, logits = pair
    return out * 2 + logits.sum(1)[:, None, None, None]


FORWARD_MODE = ["kwta-sample", "kwta-channel-abs", "sap-exact", "sap-bernoulli",
                "noise-additive", "noise-multiplicative", "cas-label", "cas-argmax"]
# masked_conv2d's kernels have no forward-mode rule: test_forward_mode_refused.
CONV = ["conv-out-mask", "conv-sample-mask", "conv-weight-mask", "conv-soft-sample-masks"]
NAMES = FORWARD_MODE + CONV


def _case(device_backend, name):
    device, backend = device_backend
    dtype = _dtype(backend)
    f, ref, x = _cases(device, dtype)[name]
    return f, ref, x, dtype


@pytest.mark.parametrize("name", NAMES)
def test_grad_and_double_backward(device_backend, name):
    """Backward and double backward (differentiating the gradient in both the incoming gradient
    and x, as gradient penalties do) equal the reference's autograd."""
    f, ref, x, dtype = _case(device_backend, name)
    v = torch.randn_like(f(x))
    results = []
    for fn in (f, ref):
        t = x.clone().requires_grad_()
        w = v.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(t) * w).sum(), t, create_graph=True)
        penalty = (g.square() * torch.linspace(0.5, 1.5, g.numel(), dtype=dtype,
                                                device=g.device).view_as(g)).sum()
        gw, gt = torch.autograd.grad(penalty, (w, t), allow_unused=True)
        results.append((g, gw, torch.zeros_like(x) if gt is None else gt))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **_tol(dtype))
    assert results[0][1].ne(0).any()


@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(device_backend, name):
    device, backend = device_backend
    if _dtype(backend) != torch.float64:
        pytest.skip("gradgradcheck needs float64")
    f, _, x, _ = _case(device_backend, name)
    if name.startswith("sap"):
        # The reference treats q = 1 - (1 - p)^r as a constant of x (SPEC: grad * kept / q);
        # finite differences would see q move with x. The gradient's derivative in the
        # incoming gradient is checked numerically, the one in x against the reference above.
        t = x.clone()
        assert torch.autograd.gradcheck(
            lambda g: torch.autograd.grad(f(t.requires_grad_()), t, g, create_graph=True)[0],
            (torch.randn_like(x).requires_grad_(),))
        return
    assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("name", FORWARD_MODE)
def test_forward_mode(device_backend, name):
    """torch.func.jvp, jacfwd and torch.autograd.forward_ad give the reference's tangents."""
    f, ref, x, dtype = _case(device_backend, name)
    tangent = torch.randn_like(x)
    got = jvp(f, (x,), (tangent,))[1]
    want = jvp(ref, (x,), (tangent,))[1]
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert got.ne(0).any()
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, tangent))
        dual = fwAD.unpack_dual(out).tangent
    assert dual is not None
    torch.testing.assert_close(dual, want, **_tol(dtype))
    torch.testing.assert_close(jacfwd(f, randomness="same")(x), jacfwd(ref)(x), **_tol(dtype))


@pytest.mark.parametrize("name", ["conv-out-mask", "conv-sample-mask", "conv-weight-mask"])
def test_forward_mode_refused(device_backend, name):
    """Where masked_conv2d runs pyprune's kernels, forward-mode AD raises a clear error. The
    cuda backend has no sparse-weight kernel: a bool weight mask alone folds into the weight
    of cuDNN's convolution, whose tangents are the reference's."""
    if device_backend[1] == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    f, ref, x, dtype = _case(device_backend, name)
    if device_backend[1] == "cuda" and name == "conv-weight-mask":
        tangent = torch.randn_like(x)
        torch.testing.assert_close(jvp(f, (x,), (tangent,))[1], jvp(ref, (x,), (tangent,))[1],
                                   **_tol(dtype))
        return
    with pytest.raises(NotImplementedError, match="masked_conv2d: forward-mode AD"):
        jvp(f, (x,), (torch.randn_like(x),))
    with pytest.raises(NotImplementedError, match="masked_conv2d: forward-mode AD"):
        with fwAD.dual_level():
            f(fwAD.make_dual(x, torch.randn_like(x)))


@pytest.mark.parametrize("name", NAMES)
def test_func_grad_and_jacrev(device_backend, name):
    f, ref, x, dtype = _case(device_backend, name)
    w = torch.randn_like(f(x))
    got = grad(lambda t: (f(t) * w).sum())(x)
    torch.testing.assert_close(got, grad(lambda t: (ref(t) * w).sum())(x), **_tol(dtype))
    assert got.ne(0).any()
    torch.testing.assert_close(jacrev(f)(x), jacrev(ref)(x), **_tol(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_and_per_sample_grad(device_backend, name):
    """vmap over an extra leading dim equals a loop over it (random ops: each vmap entry is
    one seeded call, so randomness='same' draws the same kept set as the loop); vmap(grad)
    gives per-entry gradients."""
    if device_backend[1] == "reference" and name.startswith(("sap", "noise")):
        pytest.skip("torch's random ops do not batch with randomness='same' on batched inputs")
    f, _, x, dtype = _case(device_backend, name)
    stack = torch.stack([x, x.flip(0), x * 0.5])
    want = torch.stack([f(s) for s in stack])
    torch.testing.assert_close(vmap(f, randomness="same")(stack), want, **_tol(dtype))
    w = torch.randn_like(want[0])
    per = vmap(grad(lambda t: (f(t) * w).sum()), randomness="same")(stack)
    loop = torch.stack([grad(lambda t: (f(t) * w).sum())(s) for s in stack])
    torch.testing.assert_close(per, loop, **_tol(dtype))


def test_vmap_uses_batching_rules(device_backend):
    """Ops whose kernels take a batch anyway run once under vmap, without torch's per-entry
    fallback (which warns)."""
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    x = torch.randn(4, 3, 2, 5, 5, device=device)
    weight = torch.randn(6, 2, device=device)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        got = vmap(lambda t: pyprune.kwta(t, 0.3))(x)
        out, logits = vmap(lambda t: pyprune.cas(t, weight))(x)
    torch.testing.assert_close(got, torch.stack([pyprune.kwta(s, 0.3) for s in x]))
    for i, s in enumerate(x):
        o, lg = pyprune.cas(s, weight)
        torch.testing.assert_close(out[i], o)
        torch.testing.assert_close(logits[i], lg)


def test_vmap_randomness_different(device_backend):
    """randomness='different': each vmap entry draws its own kept set and noise."""
    device, _ = device_backend
    x = torch.rand(2, 200, device=device) + 0.5
    stack = torch.stack([x, x])
    y = vmap(lambda t: pyprune.sap(t, 0.2), randomness="different")(stack)
    assert not torch.equal(y[0] != 0, y[1] != 0)
    n = vmap(lambda t: pyprune.gaussian_noise(t, 1.0), randomness="different")(stack)
    assert not torch.equal(n[0], n[1])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: pyprune.sap(t, 0.2))(stack)


def test_vmap_randomness_modes_of_the_default_generator(device_backend):
    """generator=None under vmap follows the randomness mode on every backend: 'same' draws one
    noise for every entry, 'different' one each, and the default 'error' refuses."""
    device, _ = device_backend
    stack = torch.zeros(3, 2, 50, device=device)

    def noise(t):
        return pyprune.gaussian_noise(t, 1.0)

    same = vmap(noise, randomness="same")(stack)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    assert same.ne(0).any()
    different = vmap(noise, randomness="different")(stack)
    assert not torch.equal(different[0], different[1])
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(noise)(stack)


def test_vmap_cas_with_a_batched_label(device_backend):
    """cas under vmap with a label per entry equals the flattened call on every backend, and a
    label out of range in any entry is refused (the check reads the wrapped labels)."""
    device, _ = device_backend
    x = torch.randn(3, 2, 4, 3, 3, device=device)
    weight, bias = torch.randn(5, 4, device=device), torch.randn(5, device=device)
    label = torch.randint(5, (3, 2), device=device)
    out, logits = vmap(lambda t, lb: pyprune.cas(t, weight, bias, lb))(x, label)
    flat_out, flat_logits = pyprune.cas(x.flatten(0, 1), weight, bias, label.flatten())
    torch.testing.assert_close(out.flatten(0, 1), flat_out)
    torch.testing.assert_close(logits.flatten(0, 1), flat_logits)
    for bad in (5, -1):
        wrong = label.clone()
        wrong[2, 1] = bad
        with pytest.raises((ValueError, RuntimeError), match="label"):
            vmap(lambda t, lb: pyprune.cas(t, weight, bias, lb))(x, wrong)
