"""SAP on every backend: the reference's distribution (unbiasedness, keep probabilities, at most
r distinct draws), seeding, gradients, opcheck, compile, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import pyprune
from pyprune import reference
from pyprune.ops.sap import _OPS

from .conftest import (TOLERANCES, TRITON_INTERPRET, assert_half_rounds_to_nearest,
                       compile_and_backward, dtypes_for)

# Standard errors allowed between a frequency / mean over D draws and its expectation.
Z = 5.0


def _sample(device, n=1, length=37, seed=0):
    """Rows with magnitudes spread over two orders, some zeros, both signs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=gen) * torch.logspace(-1, 1, length)[torch.randperm(length, generator=gen)]
    x[:, ::9] = 0.0
    return x.to(device)


def _draws(device):
    # The Triton interpreter costs ~20 ms per program (one per sample): fewer draws there.
    return 300 if TRITON_INTERPRET else 20000


def _q(x, r):
    return reference.sap_keep_probability(x.double(), r)


def _stack(row, d):
    """d copies of one sample as a batch: one call gives d independent draws of it."""
    return row.expand(d, *row.shape[1:]).contiguous()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
@pytest.mark.parametrize("r", [1, 5, 37, 80])
def test_distribution(device_backend, exact, r):
    """keep frequency -> q = 1-(1-p)^r and mean(out) -> x, within Z standard errors of D draws;
    kept values are exactly x / q. The Triton kernels keep what the CPU kernel keeps from the
    same seed (test_triton_exact_chunks_keep_the_cpu_draws, test_triton_bernoulli_items), whose
    statistics are tested here at every r with 20000 draws; the interpreter's few draws (one
    program or more a draw) check them at the smallest r and at r above L only."""
    device, backend = device_backend
    if TRITON_INTERPRET and r not in (1, 80):
        pytest.skip("the interpreter's draws: r = 1 and r = 80 (the CPU kernel's: every r)")
    d = _draws(device)
    row = _sample(device)
    x = _stack(row, d)
    torch.manual_seed(1234 + r)
    out = pyprune.sap(x, samples=r, exact=exact)
    kept = out != 0
    q = _q(row, r)[0]
    freq = kept.double().mean(0).cpu()
    se = (q * (1 - q) / d).sqrt().cpu()
    assert ((freq - q.cpu()).abs() <= Z * se + 1e-9).all(), (freq, q)
    mean = out.double().mean(0).cpu()
    se_mean = (row[0].double().abs() * ((1 / q - 1).clamp(min=0) / d).sqrt()).nan_to_num(0.0).cpu()
    assert ((mean - row[0].double().cpu()).abs() <= Z * se_mean + 1e-6).all()
    want = (x.double() / _q(x, r)).to(out.dtype)
    torch.testing.assert_close(out[kept], want[kept], rtol=1e-4, atol=0)
    assert not kept[:, row[0] == 0].any()
    if exact:
        assert (kept.sum(1) <= r).all()
        if r == 1:
            assert (kept.sum(1) == 1).all()


def test_exact_is_a_multinomial_draw(device_backend):
    """With r draws over two elements of equal mass, P(both kept) = 1 - 2^(1-r) for a true
    multinomial draw; independent (bernoulli) keeps would give (1 - 2^-r)^2."""
    device, _ = device_backend
    d = _draws(device)
    x = torch.tensor([[1.0, -1.0]], device=device).expand(d, 2).contiguous()
    torch.manual_seed(7)
    both = (pyprune.sap(x, samples=2, exact=True) != 0).all(1).double().mean().item()
    p = 0.5  # 1 - 2^(1-2)
    assert abs(both - p) <= Z * math.sqrt(p * (1 - p) / d)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_dtypes_layouts_and_ratio(device_backend, exact):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        atol, rtol = TOLERANCES[dtype]
        for x in (
            torch.randn(3, 4, 5, 7, device=device).to(dtype),
            torch.randn(3, 4, 6, 6, device=device).to(dtype).contiguous(memory_format=torch.channels_last),
            torch.randn(6, 5, 9, device=device).to(dtype)[::2].transpose(1, 2),
        ):
            for ratio in (0.5, 1.0, 2.5):
                r = int(ratio * x[0].numel())
                out = pyprune.sap(x, ratio, exact=exact)
                assert out.shape == x.shape and out.dtype == x.dtype
                kept = out != 0
                want = (x.double() / _q(x, r)).to(dtype)
                torch.testing.assert_close(out[kept], want[kept], atol=atol, rtol=max(rtol, 1e-4))
                if exact:
                    assert (kept.flatten(1).sum(1) <= r).all()
        if backend != "reference":  # the reference's flatten(1) returns a contiguous result
            cl = torch.randn(2, 3, 4, 4, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
            assert pyprune.sap(cl, exact=exact).is_contiguous(memory_format=torch.channels_last)


def test_all_zero_sample_and_empty_batch(device_backend):
    device, _ = device_backend
    x = torch.randn(3, 50, device=device)
    x[1] = 0.0
    for exact in (True, False):
        out = pyprune.sap(x, exact=exact)
        assert (out[1] == 0).all() and (out[0] != 0).any()
    e = torch.randn(0, 4, 5, device=device, requires_grad=True)
    y = pyprune.sap(e)
    assert y.shape == e.shape
    y.sum().backward()


def test_non_finite_sample_keeps_nothing(device_backend):
    """A sample with a NaN or inf leaves p = |x| / sum|x| undefined: nothing is drawn and the
    output is x * 0 (NaN at the non-finite elements, 0 elsewhere), as in the reference; the
    other samples are unaffected. Backward gives grad * 0 there."""
    device, backend = device_backend
    x = torch.rand(4, 40, device=device) + 0.5
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = -float("inf")
    bad = ~x.isfinite()
    for exact in (True, False):
        for out in (pyprune.sap(x, samples=10, exact=exact), reference.sap(x, 10, exact)):
            assert out[bad].isnan().all()
            assert (out[:3][~bad[:3]] == 0).all()
            assert (out[3] != 0).any()
        xg = x.clone().requires_grad_()
        pyprune.sap(xg, samples=10, exact=exact).backward(torch.ones_like(x))
        assert (xg.grad[:3] == 0).all() and (xg.grad[3] != 0).any()


def test_keep_probability_near_one(device_backend):
    """q = 1 - (1 - p)^r near 1 (r * log1p(-p) far below 0, exp of it subnormal) is exactly 1 to
    rounding: a kept element comes out as x / q, not a few per mille off."""
    device, _ = device_backend
    x = torch.tensor([[0.87, 0.13], [0.999, 0.001], [0.6, 0.4], [0.99, 0.01]], device=device)
    for r in (50, 200, 1000):
        for exact in (True, False):
            out = pyprune.sap(x, samples=r, exact=exact)
            kept = out != 0
            want = (x.double() / _q(x, r)).float()
            torch.testing.assert_close(out[kept], want[kept], rtol=2e-6, atol=0)
            assert kept[:, 0].all()


def test_small_keep_probability_in_half_precision(device_backend):
    """x / q with q below 1 / 65504 is representable in float16 though 1 / q is not: one draw
    from 66000 equal elements keeps one of them, scaled by 66000."""
    device, backend = device_backend
    if torch.float16 not in dtypes_for(backend):
        pytest.skip("no float16 on this backend")
    x = torch.full((1, 66000), 1e-3, dtype=torch.float16, device=device)
    for out in (pyprune.sap(x, samples=1), reference.sap(x, 1, True)):
        kept = out != 0
        assert kept.sum() == 1 and out.isfinite().all()
        torch.testing.assert_close(out[kept].float(), x[kept].float() * 66000, rtol=2e-3, atol=0)


def test_seeding(device_backend):
    device, _ = device_backend
    x = torch.randn(4, 300, device=device)
    for exact in (True, False):
        a = pyprune.sap(x, exact=exact, generator=torch.Generator(device).manual_seed(3))
        b = pyprune.sap(x, exact=exact, generator=torch.Generator(device).manual_seed(3))
        c = pyprune.sap(x, exact=exact, generator=torch.Generator(device).manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.manual_seed(5)
        a = pyprune.sap(x, exact=exact)
        torch.manual_seed(5)
        assert torch.equal(a, pyprune.sap(x, exact=exact))


@pytest.mark.parametrize("exact", [True, False])
def test_half_precision_output_rounds_to_nearest(device_backend, exact):
    """A 16-bit result is the float32 computation rounded to nearest even, on every kernel
    backend: the same seed and inputs exact in the 16-bit type keep the same elements, each
    x / q rounded."""
    if device_backend[1] == "reference":
        pytest.skip("the reference computes q in the input's dtype")
    assert_half_rounds_to_nearest(
        lambda x, gen: pyprune.sap(x, 0.5, exact=exact, generator=gen), device_backend,
        (3, 700), 9)


@pytest.mark.triton
@pytest.mark.parametrize("length", [200, 201, 1500, 9001])
def test_cpu_and_triton_share_the_stream(length):
    """Bernoulli keeps depend only on uniforms, which csrc/random.h and tl.philox produce
    bit for bit: the CPU kernel and the Triton kernel keep the same elements. The Triton pass
    takes one Philox evaluation per 4 values of n * L + j, so with L = 201 its programs start
    inside a sample; L = 1500 sums |x| over 6 element chunks; L = 9001 writes 3 blocks of 4096
    a sample, the later samples' first blocks starting inside a Philox group."""
    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter")
    x = torch.randn(3, length)
    x[1, ::5] = 0.0
    seed = torch.tensor([123456789, -987654321])
    a = torch.ops.pyprune.sap(x, seed, 100, False)
    b = torch.ops.pyprune.sap_triton(x, seed, 100, False)
    assert torch.equal(a != 0, b != 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


@pytest.mark.triton
def test_triton_bernoulli_offsets_and_aliasing(monkeypatch):
    """The bernoulli pass with int64 row offsets (WIDE, taken where a row's extent times its
    stride passes 2^31; here forced) gives what the int32 one does, forward (src is x, loaded
    once) and backward (src another tensor), on strided rows."""
    kernels = _triton_kernels()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2 * 5000, generator=gen)[:, ::2]
    grad = torch.randn(3, 5000, generator=gen)
    seed = torch.tensor([5, 6])
    forward = kernels.sap_forward(x, x, seed, 300, False)
    backward = kernels.sap_forward(grad, x, seed, 300, False)
    assert torch.equal(backward != 0, forward != 0)
    monkeypatch.setattr(kernels, "_WIDE_FROM", 0)
    assert torch.equal(kernels.sap_forward(x, x, seed, 300, False), forward)
    assert torch.equal(kernels.sap_forward(grad, x, seed, 300, False), backward)


if TRITON_INTERPRET:
    import triton
    import triton.language as tl

    from pyprune.triton_kernels.sap import _bernoulli_item

    @triton.jit
    def _bernoulli_items_kernel(out_ptr, N, KP, KB, LAG):
        """Ticket program_id's item (partials, n, c), as the bernoulli kernel decodes it."""
        t = tl.program_id(0)
        partials, n, c = _bernoulli_item(t, N, KP, KB, LAG)
        tl.store(out_ptr + 3 * t, partials.to(tl.int32))
        tl.store(out_ptr + 3 * t + 1, n)
        tl.store(out_ptr + 3 * t + 2, c)


# (N, L, block, lag, SMs, HALVES): bernoulli launches of several partials and elementwise items
# a sample. SMs (None: the launcher's _SMS) stands in for the GPU's SM count, which sets HALVES:
# a small one gives a small input the launch shape that a large one has on the GPU, in fewer
# interpreted programs.
_BERNOULLI_ITEMS = [
    # HALVES 2 (items of 2 blocks of 16, partials of 64), more partials a sample than are
    # summed one by one (_FEW_PARTIALS); L % 4 == 2
    (5, 322, 16, None, 40, 2),
    (4, 152, 16, 1, None, 1),  # lag 1: each sample's blocks right after the next one's partials
    (3, 600, 64, 3, None, 1),  # lag N: every partials item first
    (6, 131, 32, 2, None, 1),  # L % 4 == 3: a row's first block starts inside a Philox group
]


@pytest.mark.triton
@pytest.mark.parametrize("n, length, block, lag, sms, halves", _BERNOULLI_ITEMS)
def test_triton_bernoulli_items(monkeypatch, n, length, block, lag, sms, halves):
    """The one-launch bernoulli pass with many partials and elementwise items a sample (small
    blocks) and any lag keeps what the CPU kernel keeps, with its values (forward) and
    grad / q (backward), on rows whose largest p is below 2^-7 (the series path for the whole
    sample) and rows with one dominant element, a zero sample, an inf and a NaN."""
    kernels = _triton_kernels()
    if sms is not None:
        monkeypatch.setattr(kernels, "_SMS", sms)
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(n, length, generator=gen)
    x[1, 7] = 30.0 * length  # p ~ 0.96: the log path
    x[2] = 0.0
    grad = torch.randn(n, length, generator=gen)
    cfg = kernels.bernoulli_config(n, length, block)
    assert cfg["KP"] > 1 and cfg["KB"] > 2 and cfg["HALVES"] == halves
    seed = torch.tensor([3, 4])
    # r = 3: the dominant element's q = 1 - (1 - p)^3 needs its log (the series alone would be
    # 1.3% off); r = L / 2: both branches of expm1.
    for r in (length // 2, 3):
        want = torch.ops.pyprune.sap(x, seed, r, False)
        out = kernels.sap_forward(x, x, seed, r, False, _block=block, _lag=lag)
        kept = want != 0
        assert kept[1, 7] and kept.any(1)[[0, 1]].all() and not kept[2].any()
        assert torch.equal(out != 0, kept)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(kernels.sap_forward(grad, x, seed, r, False, _block=block, _lag=lag),
                               torch.ops.pyprune._sap_backward(grad, x, seed, r, False),
                               rtol=1e-5, atol=0)
    special = x[:2].clone()
    special[0, 3] = float("inf")
    special[1, 4] = float("nan")
    out = kernels.sap_forward(special, special, seed, r, False, _block=block,
                              _lag=lag and min(lag, 2))
    assert torch.equal(out.isnan(), torch.ops.pyprune.sap(special, seed, r, False).isnan())
    # A NaN or inf makes the total NaN or inf: nothing is kept, src * 0 is 0 or NaN.
    assert not (out != 0).logical_and(~out.isnan()).any()


@pytest.mark.triton
def test_triton_bernoulli_block_follows_the_row(monkeypatch):
    """Bernoulli mode launches the smallest block (256, 1024, else 4096 elements) that holds a
    row with its first Philox group's up to 3 elements before it, and keeps what the CPU kernel
    keeps at each, forward and backward; a given block overrides it."""
    kernels = _triton_kernels()
    from .conftest import LaunchSpy

    assert [kernels.bernoulli_block(n) for n in (1, 253, 254, 256, 257, 1021, 1022, 1024, 1025,
                                                 10**6)] == [256, 256, 1024, 256, 1024, 1024,
                                                             4096, 1024, 4096, 4096]
    spy = LaunchSpy(kernels._sap_bernoulli_kernel)
    monkeypatch.setattr(kernels, "_sap_bernoulli_kernel", spy)
    seed = torch.tensor([9, 10])
    for n, length, block in ((3, 37, 256), (2, 254, 1024), (2, 1024, 1024), (2, 1030, 4096)):
        x = _spread_rows(n, length, length)
        grad = torch.randn(n, length)
        r = length // 3 + 1
        want = torch.ops.pyprune.sap(x, seed, r, False)
        out = kernels.sap_forward(x, x, seed, r, False)
        assert spy.launches[-1]["BLOCK"] == block, length
        assert torch.equal(out != 0, want != 0), length
        torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
        back = kernels.sap_forward(grad, x, seed, r, False)
        torch.testing.assert_close(back, torch.where(want != 0, grad * (want / x), 0.0),
                                   rtol=1e-5, atol=1e-6)
    kernels.sap_forward(x, x, seed, 5, False, _block=64)
    assert spy.launches[-1]["BLOCK"] == 64


# Seed and value index of a uniform of exactly 0 (a Philox word below 2^8: one in 2^24),
# found with the CPU kernel (an element of q ~ 1e-30 is kept only there); the test checks it.
_ZERO_U_SEED = (7, 116278)
_ZERO_U_AT = 346


_SUBNORMAL_SHAPES = [(1, 600), (3, 173), (2, 400)]


def _check_subnormal_divisor(run, n, length, device):
    """run(src, x, seed, r) (a bernoulli forward or backward of some backend) divides a kept
    element whose q is below 2^-126 (subnormal) in full. Such an element can only be kept where
    its uniform is exactly 0, and the block holding it leaves the reciprocal fast path (whose
    flushed divisor would give inf). Forward (src = x) and backward with a src of x's scale
    (src / q of an unrelated src would overflow), against the CPU kernel."""
    seed = torch.tensor(_ZERO_U_SEED)
    row, col = divmod(_ZERO_U_AT, length)
    probe = torch.ones(n, length)
    probe[:, 0] = 1e30  # q ~ 1: kept; every other q ~ 1e-30: kept only where u = 0
    probe[row, 0], probe[row, 1 if col == 0 else 0] = 1.0, 1e30
    kept = torch.ops.pyprune.sap(probe, seed, 1, False) != 0
    assert kept[row, col] and kept.sum() == n + 1, "the seed's uniform at _ZERO_U_AT is not 0"
    gen = torch.Generator().manual_seed(length)
    x = torch.rand(n, length, generator=gen) + 0.5
    x.view(-1)[_ZERO_U_AT] = 1e-41  # p ~ 1e-44, q ~ 1e-41 < 2^-126 (the series path)
    want = torch.ops.pyprune.sap(x, seed, length, False)
    assert want.view(-1)[_ZERO_U_AT] > 0.5
    rest = torch.ones(n * length, dtype=torch.bool)
    rest[_ZERO_U_AT] = False
    xd = x.to(device)
    for src in (x, x * torch.randn(n, length, generator=gen)):
        out = run(xd if src is x else src.to(device), xd, seed.to(device), length).cpu()
        # src / q from the CPU's forward: src * (x / q) / x, in float64 (1 / q overflows float)
        expect = (src.double() * torch.where(want != 0, want.double() / x.double(), 0.0)).float()
        assert out.isfinite().all()
        assert torch.equal(out != 0, want != 0)
        # q below 2^-126 carries ~13 significant bits, rounded in each step: the subnormal
        # element's value agrees to 1%, every other to float rounding.
        torch.testing.assert_close(out.view(-1)[_ZERO_U_AT], expect.view(-1)[_ZERO_U_AT],
                                   rtol=1e-2, atol=0)
        torch.testing.assert_close(out.view(-1)[rest], expect.view(-1)[rest], rtol=1e-5, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("n, length", _SUBNORMAL_SHAPES)
def test_triton_bernoulli_subnormal_divisor(n, length):
    """The Triton bernoulli launch divides a kept element of subnormal q in full (the
    interpreter flushes the reciprocal's divisor as the hardware does), rows of every Philox
    alignment."""
    kernels = _triton_kernels()
    _check_subnormal_divisor(lambda src, x, seed, r: kernels.sap_forward(src, x, seed, r, False),
                             n, length, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n, length", _SUBNORMAL_SHAPES)
def test_gpu_bernoulli_subnormal_divisor(backend, n, length):
    """The compiled kernels (CUDA's bernoulli_pack and Triton's HW_RCP reciprocal) divide a
    kept element of subnormal q in full."""
    if backend == "triton":
        from pyprune.triton_kernels import sap as kernels

        def run(src, x, seed, r):
            return kernels.sap_forward(src, x, seed, r, False)
    else:
        def run(src, x, seed, r):
            if src is x:
                return torch.ops.pyprune.sap(x, seed, r, False)
            return torch.ops.pyprune._sap_backward(src, x, seed, r, False)
    _check_subnormal_divisor(run, n, length, "cuda")


def _counters_zero() -> bool:
    """Whether every kept counter buffer (triton_kernels/_counters) is all zero."""
    from pyprune.triton_kernels import _counters

    return all(not b.any() for b in _counters._BUFFERS.values())


def _failed_launch_leaves_counters_zero(monkeypatch, kernels, name, count_at, call):
    """kernels.<name> replaced by a launch that counts (its argument count_at, the kept
    counters) and then raises: call raises, and the counters are zero after it."""

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[count_at][:2] = 3
                raise RuntimeError("launch failed")

            return launch

    monkeypatch.setattr(kernels, name, Failing())
    with pytest.raises(RuntimeError, match="launch failed"):
        call()
    assert _counters_zero()


@pytest.mark.triton
def test_triton_bernoulli_counters_left_zero(monkeypatch):
    """The bernoulli launch takes its ticket and per-sample counts from kept counters (no fill
    launch) and leaves every one zero for the next launch: calls of other shapes, lags and
    blocks one after another (the buffer grown by the larger batch) each keep what the CPU
    kernel keeps, and the buffer is zero after each. A launch that raises part way leaves it
    zero too."""
    kernels = _triton_kernels()
    from pyprune.triton_kernels import _counters

    seed = torch.tensor([5, 6])
    cases = [(n, length, block, lag) for n, length, block, lag, _, _ in _BERNOULLI_ITEMS]
    # Partials a sample: 1 to 4 summed as scalars, 5 by the tile (as the items above); 40
    # samples grow the buffer.
    cases += [(1, 1, 16, None), (40, 70, 32, 7), (2, 20000, 4096, None), (2, 128, 16, None),
              (2, 129, 16, 1)]
    kps = [kernels.bernoulli_config(n, length, block)["KP"] for n, length, block, _ in cases]
    assert kps[-5:] == [1, 2, 3, 4, 5] and max(kps[:-5]) > 5
    for n, length, block, lag in cases:
        x = _spread_rows(n, length, n + length)
        want = torch.ops.pyprune.sap(x, seed, length, False)
        out = kernels.sap_forward(x, x, seed, length, False, _block=block, _lag=lag)
        assert torch.equal(out != 0, want != 0), (n, length)
        assert _counters_zero(), (n, length, block, lag)
    assert max(b.numel() for b in _counters._BUFFERS.values()) >= 41

    # The count tensor: after src, x, out, the seed's 5 arguments and part.
    _failed_launch_leaves_counters_zero(monkeypatch, kernels, "_sap_bernoulli_kernel", 9,
                                        lambda: kernels.sap_forward(x, x, seed, 3, False))


@pytest.mark.triton
def test_triton_exact_counters_left_zero(monkeypatch):
    """Exact mode's partials launch counts each sample's finished partials on kept counters
    (no fill launch): the last one makes the sample's prefix rows, and every count is zero
    again after the launch. Calls of other shapes one after another (a prefix of several PB
    steps, a sample with a NaN, 70 samples growing the buffer) keep the CPU's draws and leave
    the buffer zero; a launch that raises part way leaves it zero too."""
    kernels = _triton_kernels()
    from pyprune.triton_kernels import _counters

    seed = torch.tensor([11, 12])
    cases = [(3, 600, 700, None), (2, 1200, 900, (8, 8, 8)), (70, 40, 40, None),
             (1, 5, 1, None)]
    for n, length, r, chunks in cases:
        x = _spread_rows(n, length, n + length)
        if n == 3:
            x[1, 5] = float("nan")
        want = torch.ops.pyprune.sap(x, seed, r, True) != 0
        out = kernels.sap_forward(x, x, seed, r, True, _chunks=chunks)
        kept = out != 0
        assert (kept != want).sum() <= 1, (n, length, r)
        if n == 3:  # the NaN sample keeps nothing: NaN * 0 where x is NaN, 0 elsewhere
            assert out[1, 5].isnan() and out[1].nan_to_num(1.0).eq(0).sum() == length - 1
            kept = kept[[0, 2]]
        assert kept.any(1).all()
        assert _counters_zero(), (n, length, r)
    e, d, _ = (8, 8, 8)
    assert math.ceil(1200 / e) + math.ceil(904 / d) > 2 * kernels._PARTIALS_PREFIX_BLOCK
    assert max(b.numel() for b in _counters._BUFFERS.values()) >= 70

    # The count tensor: after x, the seed's 5 arguments, bx, bd and draws.
    _failed_launch_leaves_counters_zero(monkeypatch, kernels, "_sap_partials_kernel", 9,
                                        lambda: kernels.sap_forward(x, x, seed, 3, True))


@pytest.mark.triton
def test_triton_bernoulli_item_order():
    """_bernoulli_item maps the tickets 0 .. N (KP + KB) - 1 onto every partials item (n, c <
    KP) and every elementwise item (n, c < KB) once each, a sample's elementwise items after
    all of its partials and after the partials of sample n + LAG (or the last sample's)."""
    _triton_kernels()
    for n_rows, kp, kb in [(1, 1, 1), (3, 1, 2), (4, 3, 2), (5, 2, 5)]:
        for lag in range(1, n_rows + 1):
            grid = n_rows * (kp + kb)
            out = torch.full((grid, 3), -1, dtype=torch.int32)
            _bernoulli_items_kernel[(grid,)](out, n_rows, kp, kb, lag)
            seen = {(bool(p), n, c): t for t, (p, n, c) in enumerate(out.tolist())}
            want = ({(True, n, c) for n in range(n_rows) for c in range(kp)}
                    | {(False, n, c) for n in range(n_rows) for c in range(kb)})
            assert set(seen) == want, (n_rows, kp, kb, lag)
            for n in range(n_rows):
                first = min(seen[(False, n, c)] for c in range(kb))
                ahead = min(n + lag, n_rows - 1)
                assert first > max(seen[(True, m, c)] for m in (n, ahead) for c in range(kp))


def _triton_kernels():
    if not TRITON_INTERPRET:
        pytest.skip("needs the Triton interpreter")
    from pyprune.triton_kernels import sap as kernels

    return kernels


def _spread_rows(n, length, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=gen) * torch.rand(n, length, generator=gen) ** 3
    x[:, ::7] = 0.0
    return x


# (N, L, r, (E, D, DT) or None for the launcher's chunks, the chunk search's width or None for
# the launcher's _SEARCH_WIDTH). Sample n's draws start at stream index n * (r + 1), which no
# case makes a multiple of 4.
_CHUNKINGS = [
    (3, 600, 700, None, None),  # default sizes: 3 element chunks (the last partial), 3 draw chunks
    (3, 100, 80, (16, 16, 8), None),  # 7 element chunks, 6 draw chunks of two tiles each
    (2, 75, 301, (32, 8, 4), None),  # ~13 draw chunks per element chunk
    (4, 37, 3, (8, 8, 8), None),  # fewer draws than element chunks: chunks without a draw
    # 38 draw chunks, more than one step of the search probes: it takes two steps of 16 (as
    # more than 128 chunks take at the launcher's width, in 4x the interpreted draws)
    (2, 40, 300, (16, 8, 4), 16),
]


@pytest.mark.triton
@pytest.mark.parametrize("n,length,r,chunks,width", _CHUNKINGS,
                         ids=[str(c[:3]) for c in _CHUNKINGS])
def test_triton_exact_chunks_keep_the_cpu_draws(monkeypatch, n, length, r, chunks, width):
    """The Triton exact kernel splits each sample into element chunks and draw chunks (prefix
    sums of chunk partials, a search for the draw chunks that reach an element chunk, a binary
    search per draw); the CPU merges the same stream serially in double. Positions round
    differently, so a draw within rounding of an element's end may fall the other way: at most
    one element differs here. Backward (src = grad) keeps the same set, also when the merge's
    persistent programs take several chunks each (2 programs)."""
    kernels = _triton_kernels()
    if width is not None:
        assert math.ceil((r + 4) / chunks[1]) > width
        monkeypatch.setattr(kernels, "_SEARCH_WIDTH", width)
        assert kernels._config(length, r, True)["merge"]["W"] == width
    x = _spread_rows(n, length, 11)
    seed = torch.tensor([2024, -7])
    want = torch.ops.pyprune.sap(x, seed, r, True) != 0
    out = kernels.sap_forward(x, x, seed, r, True, _chunks=chunks)
    kept = out != 0
    assert (kept != want).sum() <= 1, (kept != want).nonzero()
    assert want.any(1).all() and (kept.sum(1) <= r).all()
    torch.testing.assert_close(out[kept], (x.double() / _q(x, r)).float()[kept], rtol=1e-4, atol=0)
    grad = torch.rand_like(x) + 0.5
    back = kernels.sap_forward(grad, x, seed, r, True, _chunks=chunks, _slots=2)
    assert torch.equal(back != 0, kept)
    torch.testing.assert_close(back[kept], (grad.double() / _q(x, r)).float()[kept], rtol=1e-4, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("n,length,r", [(3, 600, 700), (2, 300, 1200), (4, 37, 3), (2, 2100, 50)])
def test_triton_exact_stored_draws_match_regenerated(n, length, r):
    """Stored mode (the partials pass writes each draw chunk's running sums, the merge reads
    them back; the default where r <= 4 L) keeps what regenerating the draws in the merge
    keeps, value for value, forward and backward, also with several element chunks a program;
    r = 4 L is stored, r above it is not (the workspace then stays O(N * chunks))."""
    kernels = _triton_kernels()
    x = _spread_rows(n, length, 5)
    grad = torch.rand_like(x) + 0.5
    seed = torch.tensor([77, -3])
    for src in (x, grad):
        stored = kernels.sap_forward(src, x, seed, r, True, _store=True, _slots=2)
        regenerated = kernels.sap_forward(src, x, seed, r, True, _store=False)
        assert torch.equal(stored, regenerated)
    assert torch.equal(stored != 0, kernels.sap_forward(x, x, seed, r, True) != 0)
    e, d = kernels._chunk_sizes(length, r)
    assert kernels._stores_draws(length, r, d, kernels._DT) == (r <= 4 * length)
    assert not kernels._stores_draws(length, 4 * length + 1, d, kernels._DT)
    with pytest.raises(ValueError, match="stored draws"):
        kernels.sap_forward(x, x, seed, r, False, _store=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("n,length,r", [(4, 65536, 65536), (3, 20000, 80000), (8, 300, 1)])
def test_triton_gpu_exact_stored_draws_match_regenerated(n, length, r):
    """The compiled Triton kernels: the stored draws read back keep what making them again
    keeps (one helper places a draw either way; in the same warps the same sums; a draw within
    rounding of an element's end may fall the other way if the compiler orders a sum otherwise:
    at most one element a sample), forward and backward, and they match the CPU's draws within
    that rounding."""
    from pyprune.triton_kernels import sap as kernels

    x = _spread_rows(n, length, 9).cuda()
    grad = torch.rand_like(x) + 0.5
    seed = torch.tensor([31, -7], device="cuda")
    for src in (x, grad):
        stored = kernels.sap_forward(src, x, seed, r, True, _store=True)
        regenerated = kernels.sap_forward(src, x, seed, r, True, _store=False)
        assert ((stored != 0) != (regenerated != 0)).sum(1).max() <= 1
        both = (stored != 0) & (regenerated != 0)
        assert torch.equal(stored[both], regenerated[both])
    cpu = torch.ops.pyprune.sap(x.cpu(), seed.cpu(), r, True) != 0
    assert ((stored.cpu() != 0) != cpu).sum() <= 2 * n


@pytest.mark.triton
def test_triton_exact_edge_chunks():
    """All draws on one element (one non-zero element a sample: kept with q = 1, out = x), in
    the first, a middle and the last element chunk; mass only in the first and last element
    chunks (the chunks between get no draw and keep nothing); a sample's result does not depend
    on the batch around it."""
    kernels = _triton_kernels()
    seed = torch.tensor([5, 6])
    x = torch.zeros(3, 70)
    x[0, 0], x[1, 37], x[2, 69] = 2.0, -1.5, 0.25
    for chunks in (None, (16, 8, 4)):
        assert torch.equal(kernels.sap_forward(x, x, seed, 50, True, _chunks=chunks), x)
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(2, 64)
    x[:, :8] = torch.rand(2, 8, generator=gen) + 0.5
    x[:, 57:] = torch.rand(2, 7, generator=gen) + 0.5
    out = kernels.sap_forward(x, x, seed, 40, True, _chunks=(16, 8, 4))
    assert (out[:, 8:57] == 0).all() and (out[:, :8] != 0).any() and (out[:, 57:] != 0).any()
    assert torch.equal(out != 0, torch.ops.pyprune.sap(x, seed, 40, True) != 0)
    x = _spread_rows(4, 300, 4)
    full = kernels.sap_forward(x, x, seed, 400, True)
    assert torch.equal(kernels.sap_forward(x[:2], x[:2], seed, 400, True), full[:2])


@pytest.mark.triton
def test_triton_chunk_sizes():
    """Chunk sizes depend on (L, r) only; a sample has at most 4097 draw chunks (the workspace
    is O(N * chunks)), and the launcher picks only chunk sizes in the AOT list."""
    from pyprune.triton_kernels import sap as kernels

    from pyprune.ops.sap import MAX_DRAWS

    compiled = {v[2]["E"] for v in kernels.AOT if "E" in v[2]}
    for length in (1, 37, 16383, 16384, 65536, 10**6):
        for r in (1, 255, 65536, 2**24, MAX_DRAWS):
            e, d = kernels._chunk_sizes(length, r)
            assert e in compiled and d % kernels._DT == 0
            assert -(-(r + 4) // d) <= kernels._MAX_DRAW_CHUNKS + 1


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_gradient(device_backend, exact):
    """grad * kept / q, with the kept set of the forward (regenerated from the seed)."""
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        atol, rtol = TOLERANCES[dtype]
        x = torch.randn(3, 4, 5, 6, device=device).to(dtype).requires_grad_()
        g = torch.randn_like(x)
        out = pyprune.sap(x, 0.7, exact=exact)
        (got,) = torch.autograd.grad(out, x, g)
        r = int(0.7 * 120)
        kept = out.detach() != 0
        want = torch.where(kept, g.double() / _q(x, r), 0.0).to(dtype)
        torch.testing.assert_close(got, want, atol=atol, rtol=max(rtol, 1e-4))


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bernoulli"])
def test_double_backward(device_backend, exact):
    """The gradient is grad * kept / q, linear in grad (q is a constant, as in the reference):
    with loss = sum(sap(x) * w), d/dw of |d loss / dx|^2 = 2 w (kept / q)^2."""
    device, _ = device_backend
    x = (torch.rand(3, 40, device=device) + 0.5).requires_grad_()
    w = torch.randn(3, 40, device=device, requires_grad=True)
    y = pyprune.sap(x, samples=20, exact=exact, generator=torch.Generator(device).manual_seed(1))
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    g.square().sum().backward()
    scale = y.detach() / x.detach()
    torch.testing.assert_close(w.grad, 2 * w.detach() * scale.square(), rtol=1e-5, atol=1e-6)
    assert scale.ne(0).any()


def test_backward_saves_no_mask(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference saves what autograd saves")
    x = torch.randn(4, 3, 8, 8, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pyprune.sap(x)
    assert sorted(t.numel() for t in saved) == [2, x.numel()]


def test_opcheck(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    fwd, bwd = _OPS[backend]
    seed = torch.tensor([11, 22], device=device)
    for exact in (True, False):
        x = torch.randn(3, 37, device=device, requires_grad=True)
        torch.library.opcheck(fwd, (x, seed, 20, exact))
        torch.library.opcheck(bwd, (torch.randn_like(x), x.detach(), seed, 20, exact))


def test_compile_fullgraph_model(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference's multinomial over live rows is data-dependent (eager only)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        pyprune.nn.SAP(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.ReLU(),
        pyprune.nn.SAP(samples=20, exact=False),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    assert compile_and_backward(model, x).shape == (2, 2)
    # The SAP layer's output under compile is an SAP output of its input.
    head = torch.compile(model[:3], fullgraph=True)
    h = model[:2](x)
    y = head(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], (h.double() / _q(h, h[0].numel()))[kept].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    x = torch.relu(torch.randn(16, 4096, device="cuda"))
    gen = torch.Generator("cuda").manual_seed(0)
    with pyprune.use_backend(backend):
        pyprune.sap(x, generator=gen)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = pyprune.sap(x)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert not torch.equal(first, y)  # each replay draws a fresh seed on the device
    kept = y != 0
    torch.testing.assert_close(y[kept], (x.double() / _q(x, 4096))[kept].float(), rtol=1e-4, atol=0)


BAD = [
    (dict(ratio=0.0), ValueError, "ratio must be a finite number > 0"),
    (dict(ratio=-1.0), ValueError, "ratio must be a finite number > 0"),
    (dict(ratio=float("inf")), ValueError, "ratio must be a finite number > 0"),
    (dict(ratio=float("nan")), ValueError, "ratio must not be NaN"),
    (dict(ratio=0.001), ValueError, "draws int"),
    (dict(ratio="1"), TypeError, "ratio must be a real number"),
    (dict(samples=0), ValueError, r"samples must be in \[1, 2147483647\]"),
    (dict(samples=2**63 - 1), ValueError, r"samples must be in \[1, 2147483647\]"),
    (dict(ratio=1e12), ValueError, r"ratio must be <= .* \(2147483647 draws a call\)"),
    (dict(ratio=1e300), ValueError, r"= 4.8e\+301 samples; ratio must be <= 4.47e\+07"),
    (dict(generator=1), TypeError, "generator must be a torch.Generator or None, got int"),
    (dict(samples=2.0), TypeError, "samples must be an int"),
    (dict(exact=1), TypeError, "exact must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        pyprune.sap(torch.randn(2, 3, 4, 4), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pyprune.sap(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pyprune.sap([1.0, 2.0])
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        pyprune.sap(torch.randn(8))
    with pytest.raises(ValueError, match="sample group is empty"):
        pyprune.sap(torch.randn(2, 0, 3))
    with pytest.raises(RuntimeError, match="r must be >= 1"):
        torch.ops.pyprune.sap(torch.randn(2, 3), torch.tensor([1, 2]), 0, True)
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        torch.ops.pyprune.sap(torch.randn(2, 3), torch.tensor([1.0, 2.0]), 3, True)


def test_module():
    m = pyprune.nn.SAP(samples=10, exact=False)
    assert "samples=10" in repr(m) and "exact=False" in repr(m)
    assert m(torch.zeros(2, 5)).eq(0).all()
    with pytest.raises(ValueError, match="ratio must be > 0"):
        pyprune.nn.SAP(ratio=0.0)
    with pytest.raises(ValueError, match=r"samples must be in \[1, 2147483647\]"):
        pyprune.nn.SAP(samples=0)
