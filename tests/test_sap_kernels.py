"""SAP kernels at the edges: exact-mode memory and results independent of the draw count's
chunking (CPU), r = 1 and r = 2^31 - 1, and sums of |x| that are subnormal or overflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pyprune
from pyprune import reference
from pyprune.ops.sap import MAX_DRAWS

from .conftest import TOLERANCES, dtypes_for


def _run(code: str, **env: str) -> dict:
    """Runs code in a fresh interpreter (its own peak RSS, its own read of the environment) and
    returns the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_MEMORY = """
import json, resource, time, torch, pyprune
torch.set_num_threads(1)
x = torch.rand(1, {length}, generator=torch.Generator().manual_seed(1))
pyprune.sap(x, samples=1000)  # loads the kernels and allocates what every call needs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
y = pyprune.sap(x, samples={r}, generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - t0
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"grown_kb": grown, "seconds": seconds, "y": y.tolist(), "x": x.tolist()}}))
"""


@pytest.mark.parametrize("r", [2**27, MAX_DRAWS], ids=["2^27", "2^31-1"])
def test_exact_memory_does_not_grow_with_draws(r):
    """The draws are streamed: peak RSS stays far below r * 4 bytes. With r far beyond the
    sample every element is drawn (q = 1), so out = x."""
    res = _run(_MEMORY.format(length=5, r=r), PYPRUNE_BACKEND="cpu")
    assert res["grown_kb"] < 32 * 1024, res["grown_kb"]
    torch.testing.assert_close(torch.tensor(res["y"]), torch.tensor(res["x"]))
    assert res["seconds"] < 60, res["seconds"]


_CHUNKED = """
import json, torch, pyprune
fwd, bwd = torch.ops.pyprune.sap, torch.ops.pyprune._sap_backward
out = []
for n, length, r, s in {cases}:
    g = torch.Generator().manual_seed(s)
    x = torch.randn(n, length, generator=g) * torch.rand(n, length, generator=g) ** 4
    x[:, ::7] = 0
    grad = torch.randn(n, length, generator=g)
    seed = torch.tensor([s * 7919 + 1, -s])
    for dtype in (torch.float32, torch.float64):
        out.append(fwd(x.to(dtype), seed, r, True).tolist())
        out.append(bwd(grad.to(dtype), x.to(dtype), seed, r, True).tolist())
        out.append(fwd(x.to(dtype).t().contiguous().t(), seed, r, True).tolist())
print(json.dumps(out))
"""


def test_exact_result_does_not_depend_on_the_draw_chunk():
    """The same seed gives the same kept set whether all draws fit one buffer (the one-pass
    merge) or stream through chunks whose boundaries fall elsewhere."""
    cases = [(3, 37, 5, 1), (2, 75, 100, 2), (4, 200, 1000, 3), (2, 1000, 5000, 4), (1, 9, 3, 5),
             (2, 513, 64 * 37, 6), (1, 75, 200000, 7)]
    code = _CHUNKED.format(cases=cases)
    results = [_run(code, PYPRUNE_SAP_DRAW_CHUNK=str(chunk)) for chunk in (1 << 20, 64, 640, 4096)]
    for other in results[1:]:
        assert other == results[0]


def test_exact_large_r_does_not_depend_on_the_draw_chunk():
    code = _MEMORY.format(length=300, r=2**24)  # one pass: 256 chunks; the other: 6
    a, b = (_run(code, PYPRUNE_BACKEND="cpu", PYPRUNE_SAP_DRAW_CHUNK=str(c)) for c in (1 << 16, 3 << 20))
    assert a["y"] == b["y"]


def _check_kept(x, out, q, grad):
    """out = x / q where kept, else 0; the gradient of out.sum() is kept / q (in x's dtype)."""
    kept = out != 0
    rtol = TOLERANCES[x.dtype][1]
    step = torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps  # spacing of the subnormals
    want = torch.where(kept, x.double() / q, torch.zeros_like(q))
    torch.testing.assert_close(out.double(), want, atol=step, rtol=rtol)
    torch.testing.assert_close(grad.double(), torch.where(kept, 1 / q, torch.zeros_like(q)),
                               atol=0, rtol=rtol)
    return kept


_TINY = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 1e-7, torch.float64: 1e-315}


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_subnormal_total(device_backend, exact):
    """A sample whose sum |x| is subnormal: p = |x| / sum|x| as in the reference (not x kept
    with q taken as 1, nor 1 / sum|x| overflowing)."""
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
            continue  # the interpreter's float32 -> bfloat16 cast is wrong for subnormals
        x = torch.full((2, 10), _TINY[dtype], dtype=dtype, device=device)
        x[1, :5] *= -3
        assert x.abs().sum() > 0
        x.requires_grad_(True)
        out = pyprune.sap(x, samples=4, exact=exact, generator=torch.Generator(device).manual_seed(2))
        (grad,) = torch.autograd.grad(out.sum(), x)
        q = reference.sap_keep_probability(x.detach(), 4).double()
        assert torch.allclose(q.sum(1), torch.tensor([10 * (1 - 0.9**4), 5 * (1 - 0.85**4) + 5 * (1 - 0.95**4)],
                                                     dtype=torch.float64, device=device), rtol=1e-2)
        kept = _check_kept(x.detach(), out.detach(), q, grad)
        if exact:
            assert ((1 <= kept.sum(1)) & (kept.sum(1) <= 4)).all()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_overflowing_total(device_backend, exact):
    """A sample whose sum |x| overflows the reference's accumulator (float32 for float32 and
    bfloat16 x) keeps nothing, as the reference's p = |x| / inf = 0; other samples are unaffected."""
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        if dtype == torch.float16:
            continue  # 65504 * L cannot overflow float32
        big = 1e308 if dtype == torch.float64 else 1e38
        x = torch.full((2, 10), big, dtype=dtype, device=device)
        x[1] = torch.linspace(1, 2, 10)
        x.requires_grad_(True)
        out = pyprune.sap(x, samples=30, exact=exact, generator=torch.Generator(device).manual_seed(3))
        (grad,) = torch.autograd.grad(out.sum(), x)
        want = reference.sap(x.detach(), 30, exact)
        assert (want[0] == 0).all()
        assert (out[0] == 0).all() and (grad[0] == 0).all()
        q = reference.sap_keep_probability(x.detach(), 30).double()
        _check_kept(x.detach()[1:], out.detach()[1:], q[1:], grad[1:])


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_one_draw(device_backend, exact):
    """r = 1: q = p; exact mode keeps exactly one element of each non-zero sample."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(6, 33, generator=gen) * torch.rand(6, 1, generator=gen)).to(device)
    x[:, ::4] = 0
    x.requires_grad_(True)
    out = pyprune.sap(x, samples=1, exact=exact, generator=torch.Generator(device).manual_seed(5))
    (grad,) = torch.autograd.grad(out.sum(), x)
    q = reference.sap_keep_probability(x.detach(), 1).double()
    torch.testing.assert_close(q, x.detach().double() / x.detach().double().sum(1, keepdim=True))
    kept = _check_kept(x.detach(), out.detach(), q, grad)
    if exact:
        assert (kept.sum(1) == 1).all()
    assert not kept[:, ::4].any()


# CUDA kernels (csrc/cuda/sap.cu): each sample is split into chunks of elements and of draws
# across blocks and merged back; these catch a merge that loses, duplicates or misplaces draws at
# chunk boundaries, or a chunking that depends on the batch size.
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
_CHUNK = 1024  # sap.cu's kChunk: elements of a chunk, and draws of a Philox group per thread


def _cuda_sap(x, r, exact, seed, grad=None):
    """The CUDA op (or its backward on grad) with an explicit seed."""
    s = torch.tensor(seed, device="cuda")
    if grad is None:
        return torch.ops.pyprune.sap(x, s, r, exact)
    return torch.ops.pyprune._sap_backward(grad, x, s, r, exact)


def _counts_within(kept, q, z=6.0):
    """The number of kept elements of each row within z standard deviations of sum q: a
    draw-count bound that holds for both modes (exact keeps are negatively correlated, so their
    variance is below the bernoulli sum q (1 - q))."""
    want = q.sum(-1)
    sd = (q * (1 - q)).sum(-1).sqrt()
    got = kept.double().sum(-1)
    assert ((got - want).abs() <= z * sd + 1).all(), (got, want, sd)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
@pytest.mark.parametrize("shape,r", [((1, 1), 1), ((1, 1), 7), ((3, 5), 1), ((3, 37), 100),
                                     ((2, 1000), 999), ((5, 1023), 1025), ((7, 1025), 3),
                                     ((4, 3001), 3001), ((1, 300000), 300000)])
@pytest.mark.gpu
@_needs_cuda
def test_cuda_kept_values_counts_and_repeatability(exact, shape, r):
    """Kept values are x / q; exact mode keeps at most r and, at r = 1, exactly one element of
    each row; the counts match sum q; the same seed gives the same output; backward keeps the
    forward's set. Shapes: L = 1, L below one chunk, L and r + 1 not multiples of 4 (samples
    whose first draw is not aligned to a Philox group), several chunks, one huge row."""
    gen = torch.Generator().manual_seed(shape[1] + r)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.05).cuda().float()
    x[:, 1::5] *= -1
    seed = [1234567, -7654321]
    out = _cuda_sap(x, r, exact, seed)
    assert torch.equal(out, _cuda_sap(x, r, exact, seed))
    kept = out != 0
    q = reference.sap_keep_probability(x, r).double()
    torch.testing.assert_close(out[kept].double(), (x.double() / q)[kept], rtol=1e-5, atol=0)
    if exact:
        assert (kept.sum(1) <= r).all() and (kept.sum(1) >= 1).all()
        if r == 1:
            assert (kept.sum(1) == 1).all()
    _counts_within(kept, q)
    grad = torch.randn_like(x)
    gx = _cuda_sap(x, r, exact, seed, grad)
    assert torch.equal(gx != 0, kept & (grad != 0))
    torch.testing.assert_close(gx[kept].double(), (grad.double() / q)[kept], rtol=1e-5, atol=0)


@pytest.mark.gpu
@_needs_cuda
def test_cuda_one_draw_lands_once_in_a_huge_row():
    """r = 1 over 300000 elements (293 chunks): exactly one element, for many seeds, and the
    drawn positions spread over the whole row (a draw lost or doubled at a chunk boundary, or
    the draws of one chunk only, would show)."""
    x = torch.ones(1, 300000, device="cuda")
    where = []
    for s in range(200):
        out = _cuda_sap(x, 1, True, [s, 3 * s + 1])
        idx = out[0].nonzero()
        assert idx.numel() == 1
        where.append(idx.item())
    where = torch.tensor(where, dtype=torch.float64) / 300000
    # uniform over [0, 1): 200 draws, mean 1/2 (sd 0.02), both halves hit
    assert abs(where.mean().item() - 0.5) < 0.12
    assert (where < 0.5).sum() > 50 and (where >= 0.5).sum() > 50


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("at", [0, _CHUNK - 1, _CHUNK, 150001, 299999])
@pytest.mark.parametrize("ratio", [1, 4])
def test_cuda_mass_on_one_element(at, ratio):
    """One element holds almost all the mass (at a chunk's first or last element, mid-row, the
    row's end): with r = L (draw chunks generated and placed draw by draw) and r = 4 L (draw
    chunks wholly inside the element flagged without being generated) it is drawn every time;
    the others are drawn with their tiny q."""
    L = 300000
    r = ratio * L
    x = torch.full((3, L), 1e-6, device="cuda")
    x[:, at] = 1e4
    q = reference.sap_keep_probability(x, r).double()
    for exact in (True, False):
        for s in range(5):
            out = _cuda_sap(x, r, exact, [s, -s])
            kept = out != 0
            assert kept[:, at].all()
            torch.testing.assert_close(out[:, at].double(), x[:, at].double() / q[:, at], rtol=1e-5, atol=0)
            _counts_within(kept, q)
            if exact:
                assert (kept.sum(1) <= r).all()


@pytest.mark.gpu
@_needs_cuda
def test_cuda_bernoulli_total_with_and_without_the_prefix_launch():
    """A bernoulli sample of at most 64 chunks of 2048 elements has its total summed by the
    elementwise blocks (no prefix launch), a longer one by the prefix kernel: both sum the
    partials in the same order. A row with two more elements, zeros (a 65th chunk whose partial
    is 0: the same total, the same stream for the shared elements), takes the prefix path and
    keeps the same elements with the same values. (L % 4 != 0: two launches on every GPU.)"""
    L = 64 * 2048 - 1
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(1, L, generator=gen) * torch.logspace(-2, 1, L)).cuda()
    longer = torch.cat([x, torch.zeros(1, 2, device="cuda")], 1)
    for r in (1000, L):
        out = _cuda_sap(x, r, False, [17, 18])
        assert torch.equal(_cuda_sap(longer, r, False, [17, 18])[:, :L], out)
        q = reference.sap_keep_probability(x, r).double()
        kept = out != 0
        torch.testing.assert_close(out[kept].double(), (x.double() / q)[kept], rtol=1e-5, atol=0)
        _counts_within(kept, q)


@pytest.mark.gpu
@_needs_cuda
def test_cuda_bernoulli_in_one_launch_matches_two():
    """On sm_90 a bernoulli sample of at most 64 chunks of 2048 elements with L % 4 == 0 runs in
    one launch: a cluster of blocks a sample, each holding 1, 2 or 4 chunks (4 where the batch
    still gives every SM a block: the 300-row batch; clusters of 16 for the 65536- and
    131072-element rows of one sample). It sums the same partials in the same order and draws
    the same stream as the two-launch path: the rows padded with zeros to L % 4 == 1 (two
    launches; the zero chunks' partials are 0) keep the same elements with the same values,
    forward and backward."""
    gen = torch.Generator().manual_seed(6)
    for rows, L in ((1, 4), (1, 2048), (1, 5000), (1, 16384), (1, 65536), (1, 131072),
                    (300, 16384), (300, 8192)):
        x = (torch.rand(rows, L, generator=gen) * torch.logspace(-2, 1, L)).cuda()
        g = torch.randn(rows, L, generator=gen).cuda()
        pad = torch.zeros(rows, 5 if L % 2048 else 2049, device="cuda")
        longer, g_longer = torch.cat([x, pad], 1), torch.cat([g, pad], 1)
        for r in (7, L):
            out = _cuda_sap(x, r, False, [21, 22])
            assert torch.equal(_cuda_sap(longer, r, False, [21, 22])[:, :L], out)
            grad = _cuda_sap(x, r, False, [21, 22], grad=g)
            assert torch.equal(_cuda_sap(longer, r, False, [21, 22], grad=g_longer)[:, :L], grad)
            q = reference.sap_keep_probability(x, r).double()
            kept = out != 0
            torch.testing.assert_close(out[kept].double(), (x.double() / q)[kept], rtol=1e-5,
                                       atol=0)
            torch.testing.assert_close(grad.double(), torch.where(kept, g.double() / q, 0.0),
                                       rtol=1e-5, atol=0)
            _counts_within(kept, q)


@pytest.mark.gpu
@_needs_cuda
def test_cuda_result_does_not_depend_on_the_batch():
    """A sample's draws depend on its index, r and L only, not on the batch size (the chunk sizes
    are functions of L and r)."""
    x = torch.rand(9, 5000, device="cuda") + 0.1
    for exact in (True, False):
        for r in (1, 4999, 20000):
            full = _cuda_sap(x, r, exact, [42, 43])
            assert torch.equal(_cuda_sap(x[:4].contiguous(), r, exact, [42, 43]), full[:4])
            assert torch.equal(_cuda_sap(x[:1].contiguous(), r, exact, [42, 43]), full[:1])


@pytest.mark.gpu
@_needs_cuda
def test_cuda_exact_huge_draw_count():
    """r = 2^31 - 1 over a few hundred elements: every element is drawn (q = 1), out = x; the
    draw chunks then hold many Philox groups per thread and most of them are never generated
    in the merge."""
    x = torch.rand(2, 300, device="cuda") + 0.5
    out = _cuda_sap(x, MAX_DRAWS, True, [5, 6])
    torch.testing.assert_close(out, x)


@pytest.mark.gpu
@_needs_cuda
def test_cuda_exact_statistics_over_several_chunks():
    """Keep frequency of every element of a 3000-element row (3 element chunks, 3 draw chunks)
    within Z standard errors of q over D independent draws, with magnitudes spread over two
    orders, zeros, and the row's mass unevenly spread across its chunks."""
    gen = torch.Generator().manual_seed(11)
    L, d, r = 3000, 4000, 3000
    row = torch.rand(1, L, generator=gen) * torch.logspace(-1, 1, L)[torch.randperm(L, generator=gen)]
    row[:, 1500:2048] *= 10
    row[:, ::11] = 0
    row = row.cuda()
    x = row.expand(d, L).contiguous()
    q = reference.sap_keep_probability(row, r).double()[0]
    for exact in (True, False):
        kept = _cuda_sap(x, r, exact, [99, 100 + exact]) != 0
        freq = kept.double().mean(0)
        se = (q * (1 - q) / d).sqrt()
        assert ((freq - q).abs() <= 5.5 * se + 1e-9).all()
        assert not kept[:, row[0] == 0].any()
        if exact:
            assert (kept.sum(1) <= r).all()


@pytest.mark.gpu
@_needs_cuda
def test_cuda_dtypes_and_strided_rows():
    """Half, bfloat16 and double rows, and rows that are not contiguous (scalar loads), keep the
    values x / q (in the dtype's tolerance) and, in exact mode, at most r elements."""
    base = torch.rand(6, 2600, device="cuda", dtype=torch.float64) + 0.1
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.float32):
        atol, rtol = TOLERANCES[dtype]
        for x in (base.to(dtype), base.to(dtype)[::2], base.to(dtype).t().contiguous().t()[:, 3:]):
            for exact in (True, False):
                r = 2000
                out = _cuda_sap(x, r, exact, [7, 8])
                kept = out != 0
                q = reference.sap_keep_probability(x, r).double()
                torch.testing.assert_close(out[kept].double(), (x.double() / q)[kept],
                                           rtol=max(rtol, 1e-4), atol=atol)
                if exact:
                    assert (kept.sum(1) <= r).all()
                _counts_within(kept, q)
