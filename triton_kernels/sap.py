"""Stochastic activation pruning Triton kernel and launcher (contract: csrc/cpu/sap.cpp).

x is an (N, L) view with any strides; one program per sample, one launch. The program sums |x|
over the sample (tile by tile, as the prefix sums below accumulate), then:

* bernoulli (EXACT=False): one elementwise pass, element j kept when u_j < q_j;
* exact: the r draws are sorted uniforms S_i / S_r (S: prefix sums of r + 1 Exp(1) spacings,
  regenerated from the seed, never stored) scaled by sum|x|, merged with the prefix sum C of |x|
  tile by tile: a draw lands on the element j with C_{j-1} <= draw < C_j. Within a tile a draw
  finds its element by counting the tile's C_j at or below it (a DRAWS x BLOCK compare), so no
  search structure, sort or index tensor is needed. A chunk of draws that runs past the tile
  is taken again with the next tile.

Kept elements are written as src / q with q = -expm1(r * log1p(-p)) (src: x forward, grad
backward: backward regenerates the kept set), the rest as src * 0 (NaN where src is NaN or inf,
as in the reference). A sample with a NaN or inf keeps nothing, as does one whose float32 sum
overflows (the reference's p = |x| / inf = 0). A total below 2^-64 would make |x| / total and
total / S_r lose digits or underflow: it and every |x| are scaled by 2^64 first (exact; p is
unchanged). log1p and expm1 are built from log and exp with the Goldberg / Kahan corrections,
which keep full relative accuracy near 0. Counters and the draw index are int64 (r + 1 and the
loops' last step pass 2^31 - 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._random import exponential, load_seed, uniform
from .cas import on_device

_BERNOULLI_BLOCK = 1024
_EXACT_BLOCK = 64
_DRAWS = 64
# Warps of the exact and the bernoulli launch: a 1024-element bernoulli block in 4 warps would
# take 143 registers per thread (18.8% occupancy on sm_90), in 8 it takes 62.
_EXACT_WARPS = 4
_BERNOULLI_WARPS = 8
_TINY_TOTAL = tl.constexpr(2.0**-64)
_TINY_SCALE = tl.constexpr(2.0**64)
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _log1p(x):
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(y):
    # The correction is needed near 0 only; below -1, u - 1 is exact to rounding (and log(u)
    # of a subnormal u would not be).
    u = tl.exp(y)
    return tl.where(u == 1.0, y, tl.where(y < -1.0, u - 1.0, (u - 1.0) * (y / tl.log(u))))


@triton.jit
def _keep_probability(a, total, r):
    return -_expm1(r.to(tl.float32) * _log1p(-(a / total)))


@triton.jit
def _sap_kernel(
    src_ptr, x_ptr, out_ptr, seed_ptr,
    L, r,
    x_sn, x_sl, src_sn, src_sl, out_sn, out_sl,
    EXACT: tl.constexpr,
    BLOCK: tl.constexpr,
    DRAWS: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    key, stream = load_seed(seed_ptr)
    x_row = x_ptr + n * x_sn
    src_row = src_ptr + n * src_sn
    out_row = out_ptr + n * out_sn
    lanes = tl.arange(0, BLOCK).to(tl.int64)

    # sum |x|, accumulated exactly as the merge below accumulates its prefix sums.
    # A NaN or inf in the sample leaves p undefined: nothing is drawn (total becomes NaN; the
    # tile maximum alone would skip a NaN).
    total = tl.zeros([], dtype=tl.float32)
    nonfinite = tl.zeros([], dtype=tl.int32)
    start = n * 0
    while start < L:
        offs = start + lanes
        a = tl.abs(tl.load(x_row + offs * x_sl, mask=offs < L, other=0.0).to(tl.float32))
        total += tl.max(tl.cumsum(a, 0), 0)
        nonfinite += tl.sum(((a != a) | (a == float("inf"))).to(tl.int32), 0)
        start += BLOCK
    total = tl.where(nonfinite > 0, float("nan"), total)
    pre = tl.where(total < _TINY_TOTAL, _TINY_SCALE, 1.0)
    total = total * pre

    if EXACT:
        draws = tl.arange(0, DRAWS).to(tl.int64)
        base = n * r + n
        spacings = tl.zeros([], dtype=tl.float32)
        d0 = n * 0
        while d0 <= r:
            d = d0 + draws
            e = tl.where(d <= r, exponential(key, stream, base + d), 0.0)
            spacings += tl.max(tl.cumsum(e, 0), 0)
            d0 += DRAWS
        scale = total / spacings  # draw i sits at S_i * scale in the units of C
        carry_c = tl.zeros([], dtype=tl.float32)
        carry_s = tl.zeros([], dtype=tl.float32)
        first = n * 0  # first draw not yet merged into an earlier tile
        start = n * 0
        while start < L:
            offs = start + lanes
            in_row = offs < L
            a = tl.abs(tl.load(x_row + offs * x_sl, mask=in_row, other=0.0).to(tl.float32)) * pre
            c = tl.cumsum(a, 0) + carry_c
            tile_hi = tl.max(c, 0)
            bound = tl.where(in_row, c, float("inf"))
            kept = tl.zeros([BLOCK], dtype=tl.int32)
            go = (first < r) & (total > 0)
            while go:
                d = first + draws
                valid = d < r
                s = tl.cumsum(tl.where(valid, exponential(key, stream, base + d), 0.0), 0) + carry_s
                v = s * scale
                inside = valid & (v >= carry_c) & (v < tile_hi)
                pos = tl.sum((bound[None, :] <= v[:, None]).to(tl.int32), 1)
                hit = inside[:, None] & (pos[:, None] == lanes[None, :].to(tl.int32))
                kept = tl.maximum(kept, tl.max(hit.to(tl.int32), 0))
                consumed = tl.max(tl.where(valid, v, 0.0), 0) < tile_hi
                first = tl.where(consumed, first + DRAWS, first)
                carry_s = tl.where(consumed, tl.max(s, 0), carry_s)
                go = consumed & (first < r)
            q = _keep_probability(a, total, r)
            g = tl.load(src_row + offs * src_sl, mask=in_row, other=0.0)
            y = tl.where(kept != 0, g.to(tl.float32) / q, g.to(tl.float32) * 0.0)
            tl.store(out_row + offs * out_sl, y.to(g.dtype), mask=in_row)
            carry_c = tile_hi
            start += BLOCK
    else:
        start = n * 0
        while start < L:
            offs = start + lanes
            in_row = offs < L
            a = tl.abs(tl.load(x_row + offs * x_sl, mask=in_row, other=0.0).to(tl.float32)) * pre
            q = _keep_probability(a, total, r)
            u = uniform(key, stream, n * L + offs)
            g = tl.load(src_row + offs * src_sl, mask=in_row, other=0.0)
            y = tl.where(u < q, g.to(tl.float32) / q, g.to(tl.float32) * 0.0)
            tl.store(out_row + offs * out_sl, y.to(g.dtype), mask=in_row)
            start += BLOCK


def _config(exact: bool) -> tuple[int, int, int]:
    """(BLOCK, DRAWS, num_warps) of a launch."""
    return ((_EXACT_BLOCK, _DRAWS, _EXACT_WARPS) if exact
            else (_BERNOULLI_BLOCK, _DRAWS, _BERNOULLI_WARPS))


def sap_forward(src: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, r: int, exact: bool) -> torch.Tensor:
    """src / q where the draws (from x, the seed's stream) keep an element, else 0; src is x in
    forward and grad in backward."""
    if x.dim() != 2 or src.shape != x.shape:
        raise ValueError(f"sap (triton): x must be a 2-D (N, L) view and src of its shape, got "
                         f"x {tuple(x.shape)}, src {tuple(src.shape)}")
    if x.dtype not in _TL_DTYPES or src.dtype != x.dtype:
        raise TypeError(f"sap (triton): x must be float32, float16 or bfloat16 (src alike), got {x.dtype}")
    if seed.dtype != torch.int64 or seed.shape != (2,) or seed.device != x.device:
        raise ValueError("sap (triton): seed must be an int64 (2,) tensor on x's device")
    if r < 1:
        raise ValueError(f"sap (triton): r must be >= 1, got {r}")
    out = torch.empty_like(src)
    if x.numel() == 0:
        return out
    N, L = x.shape
    block, draws, num_warps = _config(exact)
    with on_device(x):
        _sap_kernel[(N,)](
            src, x, out, seed, L, r,
            *x.stride(), *src.stride(), *out.stride(),
            EXACT=exact, BLOCK=block, DRAWS=draws, num_warps=num_warps,
        )
    return out


def _aot_variants() -> list[tuple]:
    variants = []
    for dtype in _TL_DTYPES.values():
        for exact in (False, True):
            block, draws, num_warps = _config(exact)
            constexprs = {"EXACT": exact, "BLOCK": block, "DRAWS": draws}
            signature = {name: "i32" for name in _sap_kernel.arg_names}
            signature.update({"src_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                              "seed_ptr": "*i64", **{k: "constexpr" for k in constexprs}})
            variants.append((_sap_kernel, signature, constexprs, {"num_warps": num_warps}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
