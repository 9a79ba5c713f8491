"""Bool weight masks on the Triton backend (torch.ops.pyprune._sparse_conv2d_triton behind
pyprune.masked_conv2d(..., weight_mask=bool)): the block-sparse path against pyprune.reference
(float64), its block table, that empty tiles are skipped, inf/NaN, gradients, opcheck,
compile."""
from __future__ import annotations

import itertools

import pytest
import torch

import pyprune
from pyprune import reference
from pyprune.nn import MaskedConv2d

from .conftest import (DEVICE_BACKENDS, TF32_TOLERANCE, TOLERANCES, AtenCalls,
                       compile_and_backward, spy_conv_launches)

TRITON = [p for p in DEVICE_BACKENDS if p.values[0][1] == "triton"]
pytestmark = pytest.mark.parametrize("device_backend", TRITON, indirect=True)

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation): odd sizes, channel counts that
# leave a partial 16-channel tile, strides 1-2, dilation, 1x1 and 5x5 kernels, 1x1 outputs.
GEOMETRIES = [
    (2, 5, 7, 9, 6, 3, 1, 1, 1),
    (2, 40, 36, 7, 7, 3, 1, 1, 1),
    (2, 8, 16, 8, 8, 3, 2, 1, 1),
    (2, 6, 4, 7, 11, 5, 1, 2, 2),
    (3, 20, 18, 5, 5, 1, 1, 0, 1),
    (1, 17, 3, 1, 1, 1, 1, 0, 1),
]
# Mask kinds: unstructured random, 16x16 channel tiles kept or dropped whole (with one tile
# kept at some taps only), everything kept, nothing kept.
KINDS = ["random", "tiles", "all", "nothing"]


def _mask(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    cout, cin, kh, kw = shape
    if kind == "random":
        return torch.rand(shape, generator=gen) < 0.3
    if kind == "all":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "nothing":
        return torch.zeros(shape, dtype=torch.bool)
    tiles = torch.rand((cout + 15) // 16, (cin + 15) // 16, generator=gen) < 0.5
    tiles[0, 0] = True
    m = tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:cout, :cin]
    m = m[:, :, None, None].expand(shape).clone()
    m[:16, :16, 0, :] = False  # the first tile at the first row of taps only
    return m


def _inputs(geom, dtype, kind, device, seed=0):
    n, cin, cout, h, w, k, *_ = geom
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype).to(device)
    weight = torch.randn(cout, cin, k, k, generator=gen).div(k).to(dtype).to(device)
    bias = torch.randn(cout, generator=gen).to(dtype).to(device)
    return x, weight, bias, _mask(kind, weight.shape, gen).to(device)


def _args(geom):
    return tuple((v, v) for v in geom[6:9])


def _packing(monkeypatch, packed: bool):
    """Packing on or off for the test (on: x and the masked weight laid out by _pack_kernel
    first; off: the kernel gathers from x and loads the mask's tiles itself); a spy on the
    convolution's launches, to check which ran."""
    from pyprune.triton_kernels import masked_conv as kernels

    monkeypatch.setattr(kernels, "_PACK", packed)
    return spy_conv_launches(monkeypatch)


def _ran(spy, packed: bool, gated: bool = False) -> None:
    """The weight-mask kernel ran, packed or not, GATED (carrying the dense programs) where
    packed on the tensor cores (gated: the test's dtype and precision say so)."""
    assert spy.launches and all(k["SPARSE"] and k["PACKED"] == packed
                                and k["GATED"] == (packed and gated) for k in spy.launches)


def _sparse_max(monkeypatch, share: float) -> None:
    """_SPARSE_MAX_SHARE for the test, with a fresh mask cache (its tables hold the choice):
    0.0 runs every mask that keeps a weight dense, 1.0 none."""
    from pyprune.triton_kernels import masked_conv as kernels

    monkeypatch.setattr(kernels, "_SPARSE_MAX_SHARE", share)
    monkeypatch.setattr(kernels, "_MASKS", kernels._MaskCache())


PACKED = pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])


def _close(got, want, dtype, scale, tolerance=None):
    atol, rtol = tolerance or TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol * scale,
                               equal_nan=True)


def _check_with_gradients(x, weight, bias, mask, args, scale, gen, tolerance=None):
    """pyprune.masked_conv2d(x, weight, bias, *args, weight_mask=mask) and its gradients, for
    an incoming gradient drawn from gen, against the reference's in float64 (float32
    tolerances, or the (atol, rtol) given, times scale); returns the output and the
    gradients."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = pyprune.masked_conv2d(*leaves, *args, weight_mask=mask)
    grad = torch.randn(y.shape, generator=gen).to(x.device)
    got = torch.autograd.grad(y, leaves, grad)
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = reference.masked_conv2d(*ref, *args, weight_mask=mask)
    want_grads = torch.autograd.grad(want, ref, grad.double())
    _close(y, want.detach(), torch.float32, scale, tolerance)
    for g, w in zip(got, want_grads):
        _close(g, w, torch.float32, scale, tolerance)
    return y, got


@PACKED
@pytest.mark.parametrize("geom", range(len(GEOMETRIES)))
def test_matches_reference_with_gradients(device_backend, monkeypatch, geom, packed):
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    geom = GEOMETRIES[geom]
    for kind, layout in zip(KINDS, ["contiguous", "channels_last", "contiguous", "channels_last"]):
        x, weight, bias, mask = _inputs(geom, torch.float32, kind, device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y, got = _check_with_gradients(x, weight, bias, mask, _args(geom),
                                       geom[1] * geom[5] ** 2 / 4, torch.Generator().manual_seed(1))
        if y.shape[2] * y.shape[3] > 1:  # else both layouts are one
            assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert torch.all(got[1][~mask] == 0)
    _ran(spy, packed)


@PACKED
@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (2, 5), (5, 2)], ids=str)
def test_non_square_kernels(device_backend, monkeypatch, kernel, packed):
    """kh and kw take bit fields of different widths in the block list's entries (none for a
    size-1 side): kernels of unequal sides, forward and gradients (grad_x on the flipped mask's
    table), against the reference."""
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    gen = torch.Generator().manual_seed(2)
    kh, kw = kernel
    args = ((1, 1), (kh // 2, kw // 2), (1, 1))
    for kind in ("tiles", "random"):
        x = torch.randn(2, 36, 7, 9, generator=gen).to(device)
        weight = torch.randn(20, 36, kh, kw, generator=gen).div(kh * kw).to(device)
        bias = torch.randn(20, generator=gen).to(device)
        mask = _mask(kind, weight.shape, gen).to(device)
        _check_with_gradients(x, weight, bias, mask, args, 9.0, gen)
    _ran(spy, packed)


@PACKED
@pytest.mark.parametrize("mask_layout", ["same", "contiguous"])
def test_channels_last_weight(device_backend, monkeypatch, mask_layout, packed):
    """A channels_last weight with a mask of the same strides is read as it is (the mask at
    the weight's offsets), with a contiguous mask both are made contiguous: forward and
    gradients against the reference either way."""
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    geom = GEOMETRIES[1]
    x, weight, bias, mask = _inputs(geom, torch.float32, "tiles", device)
    weight = weight.contiguous(memory_format=torch.channels_last)
    if mask_layout == "same":
        mask = mask.contiguous(memory_format=torch.channels_last)
        assert mask.stride() == weight.stride() != mask.contiguous().stride()
    _check_with_gradients(x, weight, bias, mask, _args(geom), 10.0,
                          torch.Generator().manual_seed(3))
    _ran(spy, packed)


@PACKED
def test_backward_flips_taps_in_the_packing(device_backend, monkeypatch, packed):
    """grad_x runs on the transposed weight and mask with their taps reversed: packed, the
    packing reads them so (no flipped copy of either); unpacked, the copies are made (the
    flipped mask's block table, built by the first backward, is cached). A 3x2 kernel (tap
    order matters), against the reference's gradients."""
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 36, 6, 7, generator=gen).to(device).requires_grad_()
    weight = torch.randn(20, 36, 3, 2, generator=gen).div(3).to(device).requires_grad_()
    mask = _mask("tiles", weight.shape, gen).to(device)
    y = pyprune.masked_conv2d(x, weight, None, 1, (1, 1), weight_mask=mask)
    grad = torch.randn(y.shape, generator=gen).to(device)
    torch.autograd.grad(y, (x, weight), grad, retain_graph=True)  # builds the flipped table
    with AtenCalls() as seen:
        got = torch.autograd.grad(y, (x, weight), grad)
    assert seen.calls.count("aten::flip") == (0 if packed else 2)
    ref = [t.detach().double().requires_grad_() for t in (x, weight)]
    want = torch.autograd.grad(reference.masked_conv2d(*ref, None, 1, (1, 1), weight_mask=mask),
                               ref, grad.double())
    for g, w in zip(got, want):
        _close(g, w, torch.float32, 9.0)
    _ran(spy, packed)


@PACKED
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(device_backend, monkeypatch, dtype, packed):
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    geom = GEOMETRIES[1]
    x, weight, bias, mask = _inputs(geom, dtype, "tiles", device)
    y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    assert y.dtype == dtype
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), *_args(geom),
                                   weight_mask=mask)
    _close(y, want, dtype, 4.0)
    _ran(spy, packed)


def test_block_table(device_backend):
    """Each output-channel tile lists exactly its (input tile, tap) pairs that keep a weight,
    ascending, then the rest; a last row lists them all in order; entries encoded as bit
    fields (input tile, kh, kw) of the widths _tap_bits gives."""
    from pyprune.triton_kernels.masked_conv import _block_table, _tap_bits

    device, _ = device_backend
    gen = torch.Generator().manual_seed(0)
    for shape, block in (((37, 21, 3, 2), 16), ((16, 48, 1, 1), 16), ((5, 70, 3, 3), 32),
                         ((8, 20, 1, 5), 16)):
        for kind in KINDS:
            mask = _mask(kind, shape, gen)
            if kind == "random":  # sparse enough that some tiles are empty
                mask &= torch.rand(shape, generator=gen) < 0.02
            lists, counts, ci_blocks, gated = _block_table(mask.to(device), block, block)
            cout, cin, kh, kw = shape
            bits = _tap_bits(kh, kw)
            kw_bits, kh_bits = bits & 255, bits >> 8
            assert (kw - 1) < 2**kw_bits and (kh - 1) < 2**kh_bits

            def decoded(v: int) -> int:  # the entry's c * kh * kw + tap
                c = v >> (kh_bits + kw_bits)
                r, s = (v >> kw_bits) & (2**kh_bits - 1), v & (2**kw_bits - 1)
                assert r < kh and s < kw and c < ci_blocks
                return c * kh * kw + r * kw + s

            assert ci_blocks == -(-cin // block)
            co_blocks = -(-cout // block)
            assert lists.shape == (co_blocks + 1, ci_blocks * kh * kw)
            every = [decoded(v) for v in lists[co_blocks].tolist()]
            assert every == list(range(kh * kw * ci_blocks))
            for j in range(co_blocks):
                tile = mask[j * block:(j + 1) * block].flatten(2)  # (<= block, C_in, taps)
                kept = [c * kh * kw + tap for c in range(ci_blocks) for tap in range(kh * kw)
                        if tile[:, c * block:(c + 1) * block, tap].any()]
                row = [decoded(v) for v in lists[j].tolist()]
                assert counts[j].item() == len(kept)
                assert row[:len(kept)] == kept
                assert sorted(row) == list(range(kh * kw * ci_blocks))
            # Dense (-1 each) where more than half of all the tiles keep a weight.
            dense = counts.sum().item() * 2 > co_blocks * ci_blocks * kh * kw
            assert gated.tolist() == ([-1] * co_blocks if dense else counts.tolist())
            if kind in ("all", "nothing"):
                assert dense == (kind == "all")


def test_block_table_cached_per_mask_version(device_backend, monkeypatch):
    """A weight mask's block table is built once per mask version: a second call with the same
    mask builds nothing, a mask changed in place is built again (and the result follows it),
    and another mask of the same shape gets its own; every result against the reference."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    monkeypatch.setattr(kernels, "_MASKS", kernels._MaskCache())
    built = []
    real = kernels._block_table
    monkeypatch.setattr(kernels, "_block_table", lambda m, *a: built.append(1) or real(m, *a))
    geom = GEOMETRIES[1]
    x, weight, bias, mask = _inputs(geom, torch.float32, "tiles", device)

    def check(m):
        y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=m)
        want = reference.masked_conv2d(x.double(), weight.double(), bias.double(),
                                       *_args(geom), weight_mask=m)
        _close(y, want, torch.float32, 40.0)

    check(mask)
    check(mask)
    assert len(built) == 1
    mask[:16, :16] = ~mask[:16, :16]  # in place: a new version, other tiles kept
    check(mask)
    assert len(built) == 2
    check(mask.clone())
    assert len(built) == 3
    # The backward's grad_x runs on the flipped mask: its table is built once for the mask too.
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    for _ in range(2):
        y = pyprune.masked_conv2d(*leaves, *_args(geom), weight_mask=mask)
        got = torch.autograd.grad(y, leaves[0], torch.ones_like(y))[0]
    assert len(built) == 4
    ref = x.double().requires_grad_()
    want = reference.masked_conv2d(ref, weight.double(), bias.double(), *_args(geom),
                                   weight_mask=mask)
    _close(got, torch.autograd.grad(want, ref, torch.ones_like(want))[0], torch.float32, 40.0)


def test_mask_cache_holds_no_mask(device_backend):
    """The mask cache keeps a result, not the mask's storage: a freed mask's entry has expired,
    and a hit on an expired entry (another mask at the freed address) is computed anew."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    cache = kernels._MaskCache()
    computed = []

    def compute(m):
        computed.append(1)
        return m.sum()

    mask = torch.rand(1000, device=device) < 0.5
    want = mask.sum()
    assert cache.get(mask, ("t",), compute) == want
    assert cache.get(mask, ("t",), compute) == want and len(computed) == 1
    (key, (ref, _)), = cache.entries.items()
    assert not ref.expired()
    other = torch.ones(10, dtype=torch.bool, device=device)
    cache.entries[key] = (kernels.StorageWeakRef(other.untyped_storage()), torch.tensor(-1))
    del other  # the entry now refers to a freed storage, as if the mask had been freed
    assert cache.get(mask, ("t",), compute) == want and len(computed) == 2
    del mask
    assert next(iter(cache.entries.values()))[0].expired()


@PACKED
def test_empty_tiles_are_skipped(device_backend, monkeypatch, packed):
    """With the finiteness check bypassed, inf in input channels whose weight tiles are all
    masked never reaches the output: those tiles are not computed (computing them would give
    0 * inf = NaN)."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    _sparse_max(monkeypatch, 1.0)  # half the tiles keep a weight: block-sparse either way
    geom = (2, 32, 16, 6, 6, 3, 1, 1, 1)
    x, weight, bias, _ = _inputs(geom, torch.float32, "all", device)
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=device)
    mask[:, :16] = torch.rand(16, 16, 3, 3, device=device) < 0.5
    x[:, 16:] = float("inf")
    monkeypatch.setattr(kernels, "_CHECK_FINITE", False)
    y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    want = reference.masked_conv2d(x[:, :16].double(), weight[:, :16].double(), bias.double(),
                                   *_args(geom), weight_mask=mask[:, :16])
    _close(y, want, torch.float32, 8.0)
    _ran(spy, packed)
    # The real check sends these samples through every tile: NaN appears.
    monkeypatch.setattr(kernels, "_CHECK_FINITE", True)
    y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    assert torch.isnan(y).any()
    _ran(spy, packed)


def _few_sms(monkeypatch) -> None:
    """The launcher's SM count set to 4, so that small problems keep the block-sparse tiles of
    128 pixels whose launches carry the dense programs (the GPU's 132 would shrink them)."""
    from pyprune.triton_kernels import masked_conv as kernels

    monkeypatch.setattr(kernels, "_SMS", 4)


def _masked_tiles_inf(device):
    """x, weight, bias, mask (2 x 32 -> 48 channels, 12x12) whose mask keeps weights in the
    first 16 input channels only, with inf in the other 16: a kernel that computes their
    (empty) tiles gives NaN there, as conv2d(x, weight * mask) does."""
    x, weight, bias, _ = _inputs((2, 32, 48, 12, 12, 3, 1, 1, 1), torch.float32, "all", device)
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=device)
    mask[:, :16] = torch.rand(48, 16, 3, 3, device=device) < 0.5
    x[:, 16:] = float("inf")
    return x, weight, bias, mask


# Geometries whose block-sparse tiles are 128 pixels (with _few_sms; those launches carry the
# dense programs): stride 1 (grad_x by the same kernel, on 128-pixel tiles too), stride 2, and
# one whose block-sparse grid is the larger (192 pixels by 64 channels: 2 x 4 against 3 x 2).
GATED_GEOMETRIES = [(2, 40, 36, 12, 12, 3, 1, 1, 1), (2, 24, 40, 24, 24, 3, 2, 1, 1),
                    (2, 16, 64, 8, 12, 3, 1, 1, 1)]


@pytest.mark.tf32
@pytest.mark.parametrize("dense", [False, True], ids=["block-sparse", "dense"])
def test_gated_launch(device_backend, monkeypatch, dense):
    """Packed on the tensor cores (TF32 allowed, PyTorch's default) in 128-pixel tiles, a
    weight mask's launch carries the dense kernel too (GATED): the share forced to 0 or 1
    makes a mask run the dense programs on wp or the block-sparse ones, against the reference
    (stride 1: forward and gradients, grad_x on the flipped mask's table; stride 2: forward),
    the grid the larger of the two. Which ran shows where the finiteness check is off: the
    dense programs compute the tiles that the mask empties (inf there gives NaN), the
    block-sparse ones skip them."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    spy = _packing(monkeypatch, True)
    _sparse_max(monkeypatch, 0.0 if dense else 1.0)
    _few_sms(monkeypatch)
    geom = GATED_GEOMETRIES[0]
    x, weight, bias, mask = _inputs(geom, torch.float32, "random" if dense else "tiles", device)
    _check_with_gradients(x, weight, bias, mask, _args(geom), geom[1] * 9 / 4,
                          torch.Generator().manual_seed(5), TF32_TOLERANCE)
    # 288 output pixels: max(3 x 3 block-sparse programs, 5 x 2 dense ones), twice
    assert spy.grids == [(10,)] * 2
    for geom, grid in zip(GATED_GEOMETRIES[1:], (10, 8)):
        x, weight, bias, mask = _inputs(geom, torch.float32, "tiles", device)
        want = reference.masked_conv2d(x.double(), weight.double(), bias.double(),
                                       *_args(geom), weight_mask=mask)
        spy.grids.clear()
        y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
        assert spy.grids == [(grid,)]
        _close(y, want, torch.float32, geom[1] * 9 / 4, TF32_TOLERANCE)
    monkeypatch.setattr(kernels, "_CHECK_FINITE", False)
    x, weight, bias, mask = _masked_tiles_inf(device)
    y = pyprune.masked_conv2d(x, weight, bias, 1, 1, weight_mask=mask)
    assert torch.isnan(y).any() == dense
    _ran(spy, True, gated=True)


def test_small_tiles_run_block_sparse(device_backend, monkeypatch):
    """Block-sparse tiles under 128 pixels (small problems on the GPU's SMs) launch the
    block-sparse kernel alone (not GATED), whatever the mask: an unstructured one against the
    reference."""
    device, _ = device_backend
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    spy = _packing(monkeypatch, True)
    _sparse_max(monkeypatch, 0.0)
    x, weight, bias, mask = _inputs(GEOMETRIES[1], torch.float32, "random", device)
    y = pyprune.masked_conv2d(x, weight, bias, *_args(GEOMETRIES[1]), weight_mask=mask)
    assert spy.launches[-1]["BLOCK_P"] < 128
    _ran(spy, True, gated=False)
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(),
                                   *_args(GEOMETRIES[1]), weight_mask=mask)
    _close(y, want, torch.float32, 10.0, TF32_TOLERANCE)


@pytest.mark.tf32
def test_gated_choice_by_share(device_backend, monkeypatch):
    """_SPARSE_MAX_SHARE as set: a mask most of whose tiles keep no weight runs the block-sparse
    programs (the empty tiles' inf does not reach the output with the finiteness check off),
    an unstructured one the dense programs (it does)."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    _sparse_max(monkeypatch, kernels._SPARSE_MAX_SHARE)
    _few_sms(monkeypatch)
    monkeypatch.setattr(kernels, "_CHECK_FINITE", False)
    x, weight, bias, mask = _masked_tiles_inf(device)
    unstructured = torch.rand(weight.shape, device=device) < 0.1
    for m, dense in ((mask, False), (unstructured, True)):
        y = pyprune.masked_conv2d(x, weight, bias, 1, 1, weight_mask=m)
        assert torch.isnan(y).any() == dense


@PACKED
def test_inf_nan_follow_reference(device_backend, monkeypatch, packed):
    """inf in x meets masked zeros (NaN, as conv2d(x, weight * mask) gives); inf or NaN in
    masked weights never leaks (packed: the packing zeroes them)."""
    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    geom = GEOMETRIES[1]
    x, weight, bias, mask = _inputs(geom, torch.float32, "tiles", device)
    x[0, 3, 2, 2] = float("inf")
    x[1, 20, 4, 1] = float("nan")
    weight[~mask] = float("nan")
    weight[~mask & (torch.rand(weight.shape, device=device) < 0.5)] = float("inf")
    y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), *_args(geom),
                                   weight_mask=mask)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    _close(y, want, torch.float32, 40.0)
    _ran(spy, packed)


@PACKED
@pytest.mark.parametrize("geom, last", [((12, 40, 36, 5, 5, 3, 1, 1, 1), False),
                                        ((3, 40, 20, 14, 14, 3, 1, 1, 1), True)],
                         ids=["tiles-span-samples", "two-pixel-blocks"])
def test_nonfinite_sample_found_in_any_tile(device_backend, monkeypatch, geom, last, packed):
    """inf in the last sample, in the second 32-channel chunk, in input channels whose weight
    tiles are all masked: that sample alone runs every tile (NaN where the reference has it),
    found packed from the packing launch's flags of its tiles of x, without the per-sample sum.
    5x5 maps: at the first pixel, whose outputs lie in pixel tiles (16 pixels) that start in
    the sample before; a 16x16 padded map: at the last pixel, in its second pixel block."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    spy = _packing(monkeypatch, packed)
    if packed:
        def unexpected(t):
            raise AssertionError("the packed path flags non-finite samples in its packing")
        monkeypatch.setattr(kernels, "_finite_samples", unexpected)
    x, weight, bias, _ = _inputs(geom, torch.float32, "all", device)
    mask = torch.ones(weight.shape, dtype=torch.bool, device=device)
    mask[:, 32:] = False  # the last 16-channel block: every tile empty
    n, h, w = (geom[0] - 1, geom[3] - 1, geom[4] - 1) if last else (geom[0] - 1, 0, 0)
    x[n, 35, h, w] = float("inf")
    y = pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    want = reference.masked_conv2d(x.double(), weight.double(), bias.double(), *_args(geom),
                                   weight_mask=mask)
    assert torch.isnan(want[n]).any() and not torch.isnan(want[:n]).any()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    _close(y, want, torch.float32, 40.0)
    _ran(spy, packed)


def test_routes_to_block_sparse_op(device_backend, monkeypatch):
    """A bool weight mask alone takes the weight-mask kernel; with a channel mask or groups > 1
    it folds into the weight."""
    from pyprune.triton_kernels import masked_conv as kernels

    device, _ = device_backend
    seen = []
    real = kernels.masked_conv2d_forward

    def spy(*args, weight_mask=None):
        seen.append(weight_mask is not None)
        return real(*args, weight_mask=weight_mask)

    monkeypatch.setattr(kernels, "masked_conv2d_forward", spy)
    geom = GEOMETRIES[0]
    x, weight, bias, mask = _inputs(geom, torch.float32, "random", device)
    pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask)
    pyprune.masked_conv2d(x, weight, bias, *_args(geom), weight_mask=mask,
                          out_mask=torch.ones(7, dtype=torch.bool, device=device))
    assert seen == [True, False]


def test_opcheck(device_backend):
    device, _ = device_backend
    geom = GEOMETRIES[0]
    x, weight, bias, mask = _inputs(geom, torch.float32, "random", device)
    for b in (bias, None):
        args = (x.clone().requires_grad_(), weight.clone().requires_grad_(), mask,
                None if b is None else b.clone().requires_grad_(), [1, 1], [1, 1], [1, 1])
        torch.library.opcheck(torch.ops.pyprune._sparse_conv2d_triton.default, args)
    grad = torch.randn(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], device=device)
    for flags in itertools.product((True, False), repeat=2):
        torch.library.opcheck(torch.ops.pyprune._sparse_conv2d_backward_triton.default,
                              (grad, x, weight, mask, [1, 1], [1, 1], [1, 1], *flags))


def test_module_and_compile(device_backend):
    """MaskedConv2d with a bool weight mask under torch.compile(fullgraph=True) equals eager."""
    device, _ = device_backend
    torch.manual_seed(0)
    conv = MaskedConv2d.from_conv(torch.nn.Conv2d(6, 8, 3, padding=1))
    conv.weight_mask = torch.rand(conv.weight.shape) < 0.2
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).to(device)
    x = torch.randn(2, 6, 9, 9, device=device)
    eager = model(x)
    out = compile_and_backward(model, x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert torch.all(conv.weight.grad[~conv.weight_mask] == 0)
