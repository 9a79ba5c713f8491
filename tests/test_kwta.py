"""k-WTA on every backend against pyprune.reference (float64), gradients, opcheck, compile, bad input."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyprune
from pyprune import reference
from pyprune.ops.kwta import _OPS

from .conftest import dtypes_for

# (shape, mode): odd and power-of-2 sizes, a group over 65536 elements, a single large group
# (split across threads on the CPU), groups of one element. Groups of 1 to 1024 elements take
# every lane count of the CUDA warp kernel (T = 1, 2, 4, 8, 16, 32 lanes a group: 4, 49, 100,
# 245, 400, 600 and 1024 elements).
CASES = [
    ((3, 5, 7, 7), "sample"),
    ((3, 5, 7, 7), "channel"),
    ((4, 16, 8, 8), "sample"),
    ((2, 16, 8, 8), "channel"),
    ((2, 3, 10, 10), "channel"),
    ((2, 400), "sample"),
    ((3, 2, 20, 30), "channel"),
    ((2, 3, 33, 35), "channel"),
    ((2, 70001), "sample"),
    ((1, 1 << 17), "sample"),
    ((6, 2, 1, 1), "channel"),
    ((5, 1), "sample"),
    ((2, 3, 4), "channel"),
]


def _group_size(shape, mode):
    return math.prod(shape[1:] if mode == "sample" else shape[2:])


def _expected(x, k, mode, absolute):
    """The reference in float64 (exact: upcasting keeps every value and their order), on the
    CPU: CUDA's float64 topk mis-ranks NaN (an H200, torch 2.11: its k-th largest of rows with
    NaN, and of bfloat16 values upcast, differed from the CPU's and from its own float32 one)."""
    return reference.kwta(x.double().cpu(), k, mode, absolute).to(x.device, x.dtype)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other sample of a larger batch, and reversed last dim
        big = torch.cat([x, x], dim=0).flip(-1)
        return big[::2].flip(-1)
    if layout == "transposed" and x.dim() >= 3:  # non-dense: last two dims swapped in memory
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality, NaN matching NaN and the sign of zero included. A NaN's sign bit is not
    compared: dtype conversions do not keep it (the CPU's float64 -> bfloat16 gives 0x7FC0 in
    its scalar path and 0xFFFF in its vector path, whatever the sign), and the expected values
    are converted back from float64."""
    nan = a.isnan()
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(nan, b.isnan())
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        and torch.equal(a.signbit() & ~nan, b.signbit() & ~nan)
    )


@pytest.mark.parametrize("shape,mode", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_matches_reference(device_backend, shape, mode, absolute):
    device, backend = device_backend
    n = _group_size(shape, mode)
    for dtype in dtypes_for(backend):
        for k in sorted({1, max(1, n // 10), max(1, n // 2), n}):
            x = torch.randn(shape, device=device).to(dtype)
            got = pyprune.kwta(x, k=k, mode=mode, absolute=absolute)
            assert _same(got, _expected(x, k, mode, absolute)), (dtype, k)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed"])
@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_layouts(device_backend, layout, mode):
    device, backend = device_backend
    x = _layout(torch.randn(4, 6, 9, 10, device=device), layout)
    k = max(1, int(0.2 * _group_size(x.shape, mode)))
    got = pyprune.kwta(x, k=k, mode=mode)
    assert _same(got, _expected(x, k, mode, False))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_ties_nan_inf_and_signed_zero(device_backend, absolute):
    device, backend = device_backend
    x = torch.randn(6, 3000, device=device).mul(2).round()  # many ties at every threshold
    x[0, :50] = float("nan")
    x[1, :] = float("nan")  # the k-th largest is NaN: only NaNs are kept
    x[2, ::3] = float("inf")
    x[2, 1::3] = float("-inf")
    x[3, ::2] = -0.0  # -0 ties with +0
    x[4] = 0.0
    x[5, ::7] = -float("nan")  # NaN with the sign bit set still ranks largest
    for dtype in dtypes_for(backend):
        xd = x.to(dtype)
        for k in (1, 50, 999, 1500, 3000):
            got = pyprune.kwta(xd, k=k, absolute=absolute)
            assert _same(got, _expected(xd, k, "sample", absolute)), (dtype, k)


def test_sampled_bracket_misses(device_backend):
    """Inputs whose regularly spaced elements misrepresent the group (the CPU kernel samples a
    strided subset to bracket the threshold) must still give exact results."""
    device, _ = device_backend
    n = 1 << 16
    x = torch.randn(3, n, device=device)
    for step in (16, 32, 64, 128, 256):
        x[0, ::step] = 1000.0 + torch.rand(n // step, device=device)
    x[1] = torch.arange(n, device=device, dtype=torch.float32)  # sorted
    x[2] = torch.arange(n, 0, -1, device=device, dtype=torch.float32)
    for k in (1, 100, 6553, 40000, n):
        assert _same(pyprune.kwta(x, k=k), _expected(x, k, "sample", False))
    # One group (the CPU kernel splits it across threads), in every dtype (64-bit keys too).
    _, backend = device_backend
    for dtype in dtypes_for(backend):
        one = x[:1].to(dtype)
        for k in (1, 6553, n):
            assert _same(pyprune.kwta(one, k=k), _expected(one, k, "sample", False)), (dtype, k)


@pytest.mark.parametrize("mode", ["sample", "channel"])
@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_gradient_matches_reference(device_backend, mode, absolute):
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        x = torch.randn(3, 4, 6, 5, device=device).to(dtype)
        x[0, 0, 0, :2] = float("nan")
        k = max(1, int(0.3 * _group_size(x.shape, mode)))
        g = torch.randn_like(x)
        a = x.clone().requires_grad_()
        (got,) = torch.autograd.grad(pyprune.kwta(a, k=k, mode=mode, absolute=absolute), a, g)
        b = x.double().requires_grad_()
        (want,) = torch.autograd.grad(reference.kwta(b, k, mode, absolute), b, g.double())
        assert _same(got, want.to(dtype))


@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_gradcheck_float64(device_backend, mode):
    device, backend = device_backend
    if torch.float64 not in dtypes_for(backend):
        pytest.skip(f"{backend} has no float64")
    # Distinct values far apart, so finite differences never move an element across the threshold.
    x = (torch.randperm(2 * 3 * 4 * 5, device=device).double() * 0.1).view(2, 3, 4, 5)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pyprune.kwta(t, 0.4, mode=mode, absolute=True), (x,))


@pytest.mark.parametrize("mode", ["sample", "channel"])
def test_double_backward(device_backend, mode):
    """The gradient is grad * mask, linear in grad: differentiating it (a gradient penalty, a
    Hessian-vector product) matches the reference's autograd."""
    device, _ = device_backend
    x = torch.randn(3, 4, 5, 5, device=device)
    v = torch.randn(3, 4, 5, 5, device=device, requires_grad=True)
    vr = v.detach().double().requires_grad_()
    grads = []
    for f, w, t in ((lambda t: pyprune.kwta(t, 0.3, mode=mode), v, x),
                    (lambda t: reference.kwta(t, int(0.3 * (100 if mode == "sample" else 25)), mode), vr, x.double())):
        t = t.clone().requires_grad_()
        (g,) = torch.autograd.grad((f(t) * w).sum(), t, create_graph=True)
        g.square().sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0].double(), grads[1])
    assert grads[0].ne(0).any()


def test_backward_saves_threshold_not_mask(device_backend):
    """Backward keeps x and one threshold per group: no input-sized mask or index tensor."""
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference saves what autograd saves")
    x = torch.randn(4, 3, 8, 8, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyprune.kwta(x, 0.25, mode="channel")
    sizes = sorted(t.numel() for t in saved)
    assert sizes == [4 * 3, x.numel()], sizes


def test_opcheck(device_backend):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference is plain eager PyTorch")
    fwd, bwd = _OPS[backend]
    for absolute in (False, True):
        x = torch.randn(3, 4, 37, device=device, requires_grad=True)
        torch.library.opcheck(fwd, (x, 5, absolute))
        thr = fwd(x.detach(), 5, absolute)[1]
        torch.library.opcheck(bwd, (torch.randn_like(x), x.detach(), thr, absolute))


def test_compile_fullgraph_model(device_backend):
    device, _ = device_backend
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        pyprune.nn.KWTA(ratio=0.2),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        pyprune.nn.KWTA(k=5, mode="channel"),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).to(device)
    x = torch.randn(5, 3, 12, 12, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_empty_batch(device_backend):
    device, _ = device_backend
    x = torch.randn(0, 4, 5, 5, device=device, requires_grad=True)
    for mode in ("sample", "channel"):
        y = pyprune.kwta(x, 0.5, mode=mode)
        assert y.shape == x.shape
        y.sum().backward()


def test_deterministic(device_backend):
    device, _ = device_backend
    x = torch.randn(8, 3000, device=device)
    assert torch.equal(pyprune.kwta(x, 0.1), pyprune.kwta(x, 0.1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    x = torch.randn(16, 4096, device="cuda")
    with pyprune.use_backend(backend):
        pyprune.kwta(x, 0.1)  # warm-up compiles/loads the kernel outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = pyprune.kwta(x, 0.1)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, reference.kwta(x, 409))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1 << 20, 1 << 16])
def test_cuda_groups_beyond_half_the_l2(dtype, length):
    """Groups whose x exceeds half the L2, all in flight at once (groups of 2^20: few large
    groups, clusters of blocks on sm_90; groups of 65536: more groups than two blocks an SM,
    one block each); every group's output is the reference's, ties included."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    groups = 2 * l2 // (length * dtype.itemsize) + 3
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(groups, length, device="cuda", generator=gen).to(dtype)
    x[1, : length // 4] = 0.5  # a tie across the threshold of one group
    k = int(0.1 * length)
    with pyprune.use_backend("cuda"):
        got = pyprune.kwta(x, 0.1)
    assert torch.equal(got, reference.kwta(x, k))


# Hypothesis: random shapes, k and value pools (ties, NaN, inf) on the CPU kernel.
values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 3),
    length=st.integers(1, 3000),
    fraction=st.floats(0.0, 1.0),
    pool=st.lists(values, min_size=1, max_size=4),
    absolute=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_kernel_property(n, c, length, fraction, pool, absolute, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=gen)
    special = torch.tensor(pool)[torch.randint(len(pool), (n, c, length), generator=gen)]
    x = torch.where(torch.rand(n, c, length, generator=gen) < 0.5, special, x)
    k = 1 + int(fraction * (length - 1))
    with pyprune.use_backend("cpu"):
        got = pyprune.kwta(x, k=k, mode="channel", absolute=absolute)
    assert _same(got, _expected(x, k, "channel", absolute))


# Bad input: a clear error naming the argument, before any kernel runs.
BAD = [
    (dict(ratio=0.0), ValueError, "ratio must be in"),
    (dict(ratio=1.5), ValueError, r"ratio=1.5 keeps int\(1.5 \* 48\) = 72 .* ratio must be <= 1"),
    (dict(ratio=float("inf")), ValueError, "ratio must be in"),
    (dict(ratio=-0.1), ValueError, "ratio must be in"),
    (dict(ratio=float("nan")), ValueError, "ratio must not be NaN"),
    (dict(ratio=0.001), ValueError, "keeps int"),
    (dict(ratio="0.1"), TypeError, "ratio must be a real number"),
    (dict(k=0), ValueError, r"k must be in \[1, 48\]"),
    (dict(k=49), ValueError, r"k must be in \[1, 48\]"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(ratio=0.1, k=3), ValueError, "exactly one of ratio and k"),
    (dict(), ValueError, "exactly one of ratio and k"),
    (dict(ratio=0.5, mode="pixel"), ValueError, "mode must be one of"),
    (dict(ratio=0.5, absolute=1), TypeError, "absolute must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(kwargs, error, message):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(error, match=message):
        pyprune.kwta(x, **kwargs)


def test_ratio_is_held_to_the_range_of_k():
    """k = int(ratio * group_size) must lie in [1, group_size]: a ratio just above 1 still does."""
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(pyprune.kwta(x, 1.01), pyprune.kwta(x, k=48))
    assert torch.equal(pyprune.kwta(x, 1.01, mode="channel"), pyprune.kwta(x, k=16, mode="channel"))


def test_bad_tensors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pyprune.kwta([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pyprune.kwta(torch.ones(2, 8, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pyprune.kwta(torch.ones(2, 8, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        pyprune.kwta(torch.randn(8), 0.5)
    with pytest.raises(ValueError, match="x must have at least 3 dimensions"):
        pyprune.kwta(torch.randn(2, 8), 0.5, mode="channel")
    with pytest.raises(ValueError, match="sample group is empty"):
        pyprune.kwta(torch.randn(2, 0, 4), 0.5)
    with pytest.raises(ValueError, match="channel group is empty"):
        pyprune.kwta(torch.randn(2, 3, 0), 0.5, mode="channel")


def test_forced_backend_that_cannot_run():
    x = torch.randn(2, 8)
    with pyprune.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        pyprune.kwta(x, 0.5)
    if not os.environ.get("TRITON_INTERPRET") == "1":
        with pyprune.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            pyprune.kwta(x, 0.5)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        with pyprune.use_backend("fastest"):
            pass


def test_kernel_rejects_bad_k_itself():
    """The compiled op checks its own arguments too (TORCH_CHECK), for direct torch.ops calls."""
    x = torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 8\]"):
        torch.ops.pyprune.kwta(x, 9, False)


def test_module():
    m = pyprune.nn.KWTA(ratio=0.25, mode="channel", absolute=True)
    assert "ratio=0.25" in repr(m) and "channel" in repr(m)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(m(x), reference.kwta(x, 4, "channel", True))
    with pytest.raises(ValueError, match="exactly one of ratio and k"):
        pyprune.nn.KWTA()
    with pytest.raises(ValueError, match="ratio must be in"):
        pyprune.nn.KWTA(ratio=2.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        pyprune.nn.KWTA(k=3, mode="pixel")


def test_backend_listing_and_env():
    assert pyprune.backends("cpu")[:2] == ["reference", "cpu"]
    assert "cpu" not in pyprune.backends("cuda")
    status = pyprune.backend_status("cpu")
    assert status["cpu"] == "ok" and status["cuda"] != "ok"
    code = "import pyprune, torch; from pyprune import _backend; print(_backend.current(), _backend.select('kwta', torch.ones(2, 2)))"
    env = dict(os.environ, PYPRUNE_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "reference"]
    env["PYPRUNE_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "PYPRUNE_BACKEND must be" in bad.stderr


@pytest.mark.parametrize("length", [32, 1000, 1024, 4096, 8192])
def test_triton_register_select(device_backend, length):
    """Groups held in registers (Triton: the counting select; powers of two up to 8192, others
    up to 4096): power-of-two groups (no lane masks), masked ones, the largest blocks, strided
    groups (8192 of them take the split path); random data (the passes stop early), coarse ties,
    NaN, -0, and k at both ends."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("the Triton register path")
    from pyprune.triton_kernels import kwta as kernels

    assert kernels._in_registers(length)
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(4, length, generator=gen)
    x[1] = x[1].mul(2).round()  # ties at every threshold
    x[2, ::5] = float("nan")
    x[3, ::2] = -0.0
    for dtype in dtypes_for(backend):
        xd = x.to(device=device, dtype=dtype)
        for k in sorted({1, max(1, length // 10), length - 1, length} - {0}):
            got = pyprune.kwta(xd, k=k)
            assert _same(got, _expected(xd, k, "sample", False)), (dtype, k)
        strided = xd.t().contiguous().t()  # stride 4 along the group
        got = pyprune.kwta(strided, k=max(1, length // 3), absolute=True)
        assert _same(got, _expected(strided, max(1, length // 3), "sample", True)), dtype


@pytest.mark.triton
def test_triton_group_limit():
    """The Triton kernel's streamed loop counts in int32: larger groups are refused, not looped
    forever (checked on a meta tensor, nothing allocated)."""
    from pyprune.triton_kernels import kwta as kernels

    x = torch.empty(1, 1, kernels.MAX_GROUP + 1, device="meta")
    with pytest.raises(ValueError, match="groups of at most"):
        kernels.kwta_forward(x, 1, False)


# The Triton split path (groups of >= SPLIT_MIN_GROUP elements: sample, filter, then a finish
# program a group completing it), forced on small groups with small chunks, samples
# and bin lists. `cand_min` sets the candidate capacity.
def _split_knobs(monkeypatch, kernels, cand_min):
    monkeypatch.setattr(kernels, "SPLIT_MIN_GROUP", 64)
    monkeypatch.setattr(kernels, "_SPLIT_MIN_BLOCK", 64)
    monkeypatch.setattr(kernels, "_SPLIT_MAX_BLOCK", 256)
    monkeypatch.setattr(kernels, "_SAMPLE", 256)
    monkeypatch.setattr(kernels, "_SAMPLE_MIN", 256)
    monkeypatch.setattr(kernels, "_CAND_MIN", cand_min)
    monkeypatch.setattr(kernels, "_BIN_CAP", 16)


def _record_branches(monkeypatch, kernels):
    """Spy on the finish launch: the branch each group took, from the scratch counters and bin
    counts the filter launch left (the module docstring's cases)."""
    taken = []
    real = kernels._kwta_finish_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                scratch, hist, k, cap = args[3], args[4], args[11], args[12]
                for row, bins in zip(scratch.tolist(), hist.tolist()):
                    lo, hi, _, above, inside = (v & 0xFFFFFFFF for v in row[:5])
                    hit = above < k <= above + inside
                    if hit and lo == hi:
                        taken.append("tie")
                    elif hit and inside <= cap:
                        rank, from_top = k - above, 0
                        for count in reversed(bins):  # the bin of the rank-th candidate
                            from_top += count
                            if from_top >= rank:
                                break
                        taken.append("bin list" if count <= kernels._BIN_CAP else "streamed bin")
                    else:
                        taken.append("whole group")
                real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_kwta_finish_kernel", Spy())
    return taken


def _sampled_positions(length, sample, run):
    """The elements _kwta_sample_kernel samples: a run per span of `spacing`, at a hashed
    RUN-aligned offset inside it."""
    spacing = length // (sample // run) // run * run
    slots = max(spacing // run, 1)
    starts = [j * spacing + ((j * 0x9E3779B1 & 0xFFFFFFFF) >> 12) % slots * run
              for j in range(sample // run)]
    return torch.cat([torch.arange(s, s + run) for s in starts])


SPLIT_CASES = {
    # name: (x builder over (N, L), k fraction, candidate minimum, expected branch)
    "bin_list": (lambda n, L: torch.randn(n, L), 0.2, 3000, "bin list"),
    "bin_list_half": (lambda n, L: torch.randn(n, L), 0.5, 3000, "bin list"),
    # Few distinct values: the threshold's bin (one value's key) holds more than _BIN_CAP.
    "streamed_bin": (lambda n, L: torch.randn(n, L).mul(3).round(), 0.3, 3000, "streamed bin"),
    "tie": (lambda n, L: torch.randn(n, L).relu(), 0.8, 3000, "tie"),
    "overflow": (lambda n, L: torch.randn(n, L), 0.5, 1, "whole group"),
    "sample_misses": (None, 0.1, 3000, "whole group"),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_triton_split_path(device_backend, monkeypatch, case, absolute):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("the Triton split path")
    from pyprune.triton_kernels import kwta as kernels

    build, fraction, cand_min, branch = SPLIT_CASES[case]
    _split_knobs(monkeypatch, kernels, cand_min)
    taken = _record_branches(monkeypatch, kernels)
    torch.manual_seed(0)
    n, length = 3, 3000
    if build is None:  # the sampled runs hold the largest values, which the group lacks
        x = torch.randn(n, length)
        x[:, _sampled_positions(length, 256, 16)] = 1000.0
        x = x.abs() if absolute else x
    else:
        x = build(n, length)
    x[0, 5] = float("nan")
    k = int(fraction * length)
    for dtype in dtypes_for(backend):
        xd = x.to(device=device, dtype=dtype)
        taken.clear()
        got = pyprune.kwta(xd, k=k, absolute=absolute)
        assert _same(got, _expected(xd, k, "sample", absolute)), (dtype, k)
        assert taken == [branch] * n, taken


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "abs"])
def test_triton_split_path_ties_nan_signed_zero(device_backend, monkeypatch, absolute):
    """The split path on the data of test_ties_nan_inf_and_signed_zero: ties at every
    threshold (the bracket's ends, the threshold's bin), NaN groups and NaNs in the band, -0
    beside +0 where the threshold is 0, k = 1 and k = L, half types."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("the Triton split path")
    from pyprune.triton_kernels import kwta as kernels

    _split_knobs(monkeypatch, kernels, 3000)
    torch.manual_seed(1)
    x = torch.randn(6, 1000).mul(2).round()
    x[0, :50] = float("nan")
    x[1, :] = float("nan")
    x[2, ::3] = float("inf")
    x[2, 1::3] = float("-inf")
    x[3, ::2] = -0.0
    x[3, 1::4] = 0.0
    x[4] = 0.0
    x[5, ::7] = -float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(device=device, dtype=dtype)
        for k in (1, 300, 1000):
            got = pyprune.kwta(xd, k=k, absolute=absolute)
            assert _same(got, _expected(xd, k, "sample", absolute)), (dtype, k)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed"])
def test_triton_split_path_channel_layouts(device_backend, monkeypatch, layout):
    """Many groups of a 4-D input, strided in memory, several chunks per group."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("the Triton split path")
    from pyprune.triton_kernels import kwta as kernels

    _split_knobs(monkeypatch, kernels, 16384)
    x = _layout(torch.randn(2, 3, 30, 31, device=device), layout)
    x[1, 2, :4] = float("nan")
    for k in (1, 93, 465, 930):
        assert _same(pyprune.kwta(x, k=k, mode="channel"), _expected(x, k, "channel", False)), k


def test_subnormal_threshold(device_backend):
    """A subnormal k-th largest value (bfloat16 and float32) is selected, kept (with its ties)
    and gates the gradient: no backend flushes it to zero (the Triton kernels widen bfloat16 by
    its bits)."""
    device, backend = device_backend
    for dtype in dtypes_for(backend):
        if dtype not in (torch.bfloat16, torch.float32):
            continue
        tiny = torch.finfo(dtype).tiny / 4  # subnormal
        x = torch.tensor([[0.0, tiny, 0.0, -1.0], [0.0, tiny, -3.0, tiny]], dtype=dtype,
                         device=device)
        leaf = x.clone().requires_grad_()
        out = pyprune.kwta(leaf, k=1)
        want = torch.tensor([[0.0, tiny, 0.0, 0.0], [0.0, tiny, 0.0, tiny]], dtype=dtype)
        assert torch.equal(out.detach().cpu(), want), (dtype, out)
        out.backward(torch.ones_like(x))
        assert torch.equal(leaf.grad.cpu(), (want != 0).to(dtype)), (dtype, leaf.grad)
