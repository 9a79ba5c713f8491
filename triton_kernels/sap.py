"""Stochastic activation pruning Triton kernels and launcher (contract: csrc/cpu/sap.cpp).

x is an (N, L) view with any strides. A sample is split over many programs: element chunks of
E elements and, in exact mode, draw chunks of D draws (E from L, D from r only, so a sample's
result does not depend on the batch size or the device). Two launches in exact mode, one in
bernoulli mode, no host sync, and a workspace of O(N * chunks) from the caching allocator:

1. partials, one program per (sample, chunk): sum |x| of an element chunk (NaN and inf
   propagate), and in exact mode the sum of a draw chunk's Exp(1) spacings. Draw chunks are
   aligned to multiples of 4 of the stream's global index (draw d of sample n is value
   n * (r + 1) + d), so a (DT / 4, 4) tile takes each Philox evaluation once, its four words
   being four consecutive spacings. Where a draw chunk is one tile and r <= _STORE_MAX_RATIO * L
   (stored mode), the tile's running sums are written too (float32, r + 4 a sample at most),
   and the merge reads them back: each Philox output is computed once. Otherwise (huge r) the
   merge makes the draws of the chunks it needs again, and the workspace stays O(N * chunks).
2. exact, in the same launch: prefix, by the sample's last partials program to finish (each
   counts itself done for its sample with release; the one that takes the count to K + NB
   acquires, sees every partial, and returns the count to zero: the counters are kept zero
   between launches, triton_kernels/_counters, so no fill launch precedes it): the fixed-order
   prefix sums B_k of the element partials and P_b of the draw partials, made monotone
   (running maximum of a tile cumsum), in place; B_K, the total, becomes NaN when the sample
   holds a NaN or inf (it then keeps nothing, as does a sample whose float32 sum overflows:
   the reference's p = |x| / inf = 0). Which program is last varies, but the sums do not: they
   are made in the same order by whichever it is.
3. exact: merge + write over (sample, element chunk) items. The chunk owns positions
   [B_k, B_{k+1}) (the last chunk up to +inf): local bounds C_j = B_k + in-chunk cumsum of |x|,
   made monotone, clamped to B_{k+1}, the last forced to it, so the chunks partition the line
   and a draw lands in exactly one element (the one with C_{j-1} <= v < C_j). A k-ary search
   over P * scale (scale = sum|x| / S_{r+1}) finds the draw chunks that can reach the range
   (with an allowance of 2^-12 of the total for rounding below it: a draw's v is never below
   its chunk's P_b * scale, and exceeds P_{b+1} * scale by rounding only, far less than a whole
   chunk of margin would allow, which would regenerate 2 D more draws per element chunk);
   their running sums are read back (stored mode) or the spacings made again (one Philox per
   four draws), and each draw's position
   v = (P_b + running sums) * scale comes out of the same code in every program, so a draw seen
   by two programs is in range for one of them only. A draw in range finds its element by a
   branchless binary search over the chunk's bounds, stored in a per-program scratch slot in
   global memory (2 E floats, L1-resident), and marks it there.
   Programs are persistent (at most SLOTS of them, each with its own slot), so the scratch is
   O(SLOTS * E), not O(N * L).
Bernoulli mode, one launch (_sap_bernoulli_kernel) of partials items (sum and max |x| of a
chunk) and elementwise items (blocks aligned to multiples of 4 of the uniform index n * L + j:
one Philox per four elements, 16-byte accesses where L % 4 == 0; element j kept when
u_j < q_j), taken in ticket order from an atomic counter: a sample's elementwise items come
LAG samples after its partials and wait (acquire) until all of them are counted done
(release), then sum them in a fixed order (the total does not depend on which item finished
last). Waiting only on earlier tickets cannot deadlock: their programs have started (on the
GPU, and in the interpreter's in-order run). The counters come zero and are left zero
(triton_kernels/_counters: no fill launch): the program taking the last ticket resets the
ticket, and a sample's last elementwise item past the wait resets its count. The partials of
later samples stream x from HBM while earlier samples' elementwise items compute, and x's
second read comes from L2; the
prefix launch and a second Triton launch are saved (a launch costs the host ~10 us, more than
the device time of a small batch). The sample's max |x| picks the log1p path once for all of
its elements (every p below 2^-7: the series alone). Its totals sum other chunks than exact
mode's partials, so the two modes' totals may differ by rounding.

Why a binary search and not a compare matrix: with r ~ L draws (the benchmarks' ratio 1), a
draw/element compare over T x T tiles costs ~2 T compares per element and a serial
reduce per tile pair (T = 64: ~400 ops per element, 20 times the bytes' worth at copy rate); a
search over a chunk of E = 1024 bounds costs log2(E) = 10 dependent L1 loads per draw (~60 ops
per element), and a chunk compares only the draws of the draw chunks reaching its range.

Kept elements are written as src / q with q = -expm1(r * log1p(-p)) (src: x forward, grad
backward: backward regenerates the kept set), the rest as src * 0 (NaN where src is NaN or inf,
as in the reference). A total below 2^-64 would make |x| / total and total / S lose digits or
underflow: it and every |x| are scaled by 2^64 first (exact; p is unchanged). p = |x| * (1 /
total) and q follow csrc/cpu/fast_math.h (series of log1p and expm1, Goldberg's correction of
log for p >= 2^-7), so bernoulli keeps match the CPU's. Counters and draw indices are int64
(r + 1 passes 2^31 - 1).
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ._counters import counters
from ._random import SEED_WORDS, _to_uniform, load_seed, philox4, seed_args
from .cas import INTERPRETED, _round, cdiv, next_pow2, on_device

# Elements per chunk: samples below 16384 keep chunks of 256 (a batch of 8 samples of 8192
# still makes 256 programs), from 16384 on 1024: fewer draw-chunk searches and margins per
# element (a chunk regenerates E r / L + D draws: 1.25 a element at E = 1024, 2 at 256) and
# 4x fewer items a persistent merge program (128 samples of 16384: 4 items, not 13).
_E_SMALL = 256
_E_LARGE = 1024
_E_LARGE_FROM = 16384
# Draws per tile (DT) and per chunk (D, a multiple of DT): D grows with r so that a sample has
# at most _MAX_DRAW_CHUNKS + 1 draw chunks (r = 2^31 - 1: D = 2^19, 4097 chunks).
_DT = 256
_MAX_DRAW_CHUNKS = 4096
# Elements per bernoulli block (1024 Philox evaluations): 16 a thread in 8 warps, at most
# _BERNOULLI_MAX_REGS registers (2 programs an SM, 25%; issue-bound, 16 warps an SM keep the
# schedulers busy). An elementwise item takes `halves` blocks (1, 2 or 4: the most that still
# give every SM an item) in a loop over a runtime count (unrolled, or with a constexpr count
# of 1, ptxas spilled at 128 registers): its fixed work (ticket and decode, wait, seed, the
# sample's total, the kept counters' upkeep) is ~350 lane instructions a thread, a block's
# ~820 on the fast path (forward; float32, unit strides, L % 4 == 0: 16-byte accesses; sm_90
# SASS), ~62 an element at 2 blocks, ~57 at 4; a partials item (2 halves blocks) ~240 and ~76
# a block.
_BERNOULLI_BLOCK = 4096
# Rows that fit a smaller block take it (L and, where L % 4 != 0, the up to 3 elements of a
# first Philox group that starts before the row): a 4096-element block spends its 1024 Philox
# evaluations and its lanes on a row of tens of elements. The same kernel at BLOCK 256 or 1024
# (AOT-compiled too).
_BERNOULLI_BLOCKS = (256, 1024, _BERNOULLI_BLOCK)
_BERNOULLI_MAX_REGS = 128
# An elementwise item sums up to this many partials of its sample one after another, as scalars
# (~10 lane instructions for one, where a block-wide reduction of a PB tile took ~105); more
# take the tile (their L2 round trips overlap).
_FEW_PARTIALS = tl.constexpr(4)
# The bernoulli launch's fill: H100 / H200 SMs (2 programs resident an SM).
_SMS = 132
# Row extents (elements x stride) from which the bernoulli offsets are int64 (WIDE); tests
# lower it.
_WIDE_FROM = 2**31
_PREFIX_BLOCK = 1024
# The prefix rows made at the end of the partials launch take PB = 128 partials a step: 2 a
# thread at 2 warps. A tile of 1024 there raised every partials variant's registers (72-80 on
# sm_90, 8 bytes of stack on some) for a tail one program a sample runs; 128 keeps 32.
_PARTIALS_PREFIX_BLOCK = 128
# Exact mode keeps the draws (their running sums, float32) where r <= this many times L and a
# draw chunk is one tile: the merge reads each draw back instead of making it again (a
# Philox evaluation, four logs and a tile cumsum less a tile of 256).
_STORE_MAX_RATIO = 4
_SEARCH_WIDTH = 128  # probes per step of the search over a sample's draw chunks
# Merge programs at most: what sm_90 holds at once (132 SMs x 8 programs of 2 warps at 128
# registers); more would only queue behind the resident ones, each with its own slot.
_SLOTS = 1056
# Warps per launch, and the merge's register caps (by STORED). The merge runs in 2 warps: a
# draw tile's 64 Philox evaluations are one a thread (4 warps computed each twice) and the four
# draws of an evaluation stay in its thread, four independent searches in flight; a
# 1024-element chunk is 16 elements a thread. It holds 64-bit pointers and counters across its
# loops. Reading the draws back (STORED, every r <= 4 L) it fits 128 registers: 8 programs an
# SM (25%), whose serial chains (a tile's four 10-step searches) overlap. Making them (r > 4 L)
# it spills at 128 in the strided launch and takes 136: 6 programs an SM (18.8%). sm_90 SASS of
# the float32 launch as the JIT specializes the benchmarks' (unit strides, aligned rows),
# E = 1024, a thread's instructions: ~1430 an item for its elements (bounds, scratch, q, the
# write), 91 a step of the draw-chunk search, a draw tile of 256 279 read back, 518 made (4
# warps took ~900, 86 and 410 in twice the threads, making every draw again).
_WARPS = {"partials": 2, "merge": 2, "bernoulli": 8}
_MERGE_MAX_REGS = {True: 128, False: 136}
_MARGIN = tl.constexpr(2.0**-12)  # of the total: the merge's allowance for rounding (see there)
_TINY_TOTAL = tl.constexpr(2.0**-64)
_TINY_SCALE = tl.constexpr(2.0**64)
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


_SMALL_P = tl.constexpr(0.0078125)  # p below 2^-7 takes the log1p series (csrc/cpu/fast_math.h)
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # 2^-126, the least normal float32
# e(y) = expm1(y) / y = 1 + C1 y + ... + C5 y^5 on [-1/2, 0] (csrc/cpu/fast_math.h's kExpm1C*)
_EXPM1_C1 = tl.constexpr(4.99999851e-1)
_EXPM1_C2 = tl.constexpr(1.66662887e-1)
_EXPM1_C3 = tl.constexpr(4.16320488e-2)
_EXPM1_C4 = tl.constexpr(8.19329452e-3)
_EXPM1_C5 = tl.constexpr(1.12592161e-3)
_LOG2E = tl.constexpr(1.4426950408889634)  # float32: 0x3FB8AA3B, tl.exp's factor


@triton.jit
def _neg_expm1(y):
    """-expm1(y) for y <= 0: -y e(y) with e(y) = expm1(y) / y by its degree-5 minimax
    polynomial on [-1/2, 0] (relative error 1.5e-9, below float rounding: csrc/cpu/fast_math.h),
    else 1 - exp(y), which is exact to rounding there. exp(y) is 2^(y log2 e) through tl.exp2
    (ex2.approx.ftz: one MUFU): tl.exp takes the same product and the same exp2 but without
    flushing, which costs 3 instructions an element to mend results below 2^-126, and those
    only ever meet 1 - 2^v = 1 either way. Signs sit on products (-(y e), not (-y) e: the same
    bits), so no negated copy of y is made."""
    e = _EXPM1_C5
    e = _EXPM1_C4 + y * e
    e = _EXPM1_C3 + y * e
    e = _EXPM1_C2 + y * e
    e = _EXPM1_C1 + y * e
    e = 1.0 + y * e
    return tl.where(y < -0.5, 1.0 - tl.exp2(y * _LOG2E), -(y * e))


@triton.jit
def _normal_quotient(g, q, HW_RCP: tl.constexpr):
    """g / q for a normal float32 divisor q (|q| in [2^-126, 2^126]): g times the hardware
    reciprocal alone (HW_RCP: rcp.approx.ftz.f32, one MUFU and a multiply, 2 ulp as
    div.full.f32), where `/` (div.full.f32) adds 7 instructions an element of range checks
    that change nothing in that range (csrc/cuda/sap.cu's divide does the same). The
    interpreter runs no PTX: there g times 1 / q, q flushed to 0 below 2^-126 as .ftz does
    (so a subnormal divisor gives inf there too)."""
    if HW_RCP:
        return g * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [q],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        return g * (1.0 / tl.where(tl.abs(q) < _FLT_MIN, q * 0.0, q))


@triton.jit
def _log1p_neg_series(p):
    """log1p(-p) by its series (4 terms: truncation p^5 / 5, below float rounding for p below
    2^-7), written -(p s) (the same bits as (-p) s without a negated copy of p)."""
    return -(p * (1.0 + p * (0.5 + p * (1.0 / 3 + p * 0.25))))


@triton.jit
def _keep_probability(p, r, all_small):
    """q = 1 - (1 - p)^r = -expm1(r * log1p(-p)) for a block of p, as csrc/cpu/fast_math.h's
    fast_keep_probability computes it: log1p(-p) by its series below p = 2^-7 (4 terms, within
    float rounding), else by log(1 - p) with Goldberg's correction (-p / (u - 1)), which keeps
    full relative accuracy; q = 1 from p = 1 on. all_small (a scalar: every p of the block is
    below 2^-7, as for every element of a sample of more than ~200 similar values) skips the
    log, its division and the p >= 1 test: ~27 instructions an element. Each element's q is
    the same either way."""
    rf = r * 1.0  # (r may be a constexpr 1: a launch specializes it)
    series = _log1p_neg_series(p)
    if all_small:
        q = _neg_expm1(rf * series)
    else:
        u = 1.0 - p
        goldberg = tl.log(u) * (-p / (u - 1.0))
        q = tl.where(p >= 1.0, 1.0, _neg_expm1(rf * tl.where(p < _SMALL_P, series, goldberg)))
    return q


@triton.jit
def _all_small(p):
    """Whether every p of a block is below 2^-7 (a block-wide reduction)."""
    return tl.max(tl.where(p < _SMALL_P, 0.0, 1.0)) == 0.0


@triton.jit
def _sum_max(s0, m0, s1, m1):
    return s0 + s1, tl.maximum(m0, m1)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _running_max(c):
    return tl.associative_scan(c, 0, _max_combine)


@triton.jit
def _uniforms4(key, stream, evaluation):
    """(B, 4) uniforms: row i holds values 4 e_i .. 4 e_i + 3 of the stream (e: int64 (B,)
    Philox counters), one Philox evaluation per row; and whether every one is above 0 (each
    is then at least 2^-24). The test reduces the words in their own layout: a reduction of
    the joined tile would move it through shared memory first."""
    w0, w1, w2, w3 = philox4(key, stream, evaluation)
    u0, u1, u2, u3 = _to_uniform(w0), _to_uniform(w1), _to_uniform(w2), _to_uniform(w3)
    # join(a, b) stacks on a new last axis: ((u0, u2), (u1, u3)) -> (B, 2, 2) = u0 u1 u2 u3.
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [evaluation.shape[0], 4])
    # u = (w >> 8) 2^-24 is 0 exactly where w < 2^8.
    return u, tl.min(tl.minimum(tl.minimum(w0, w1), tl.minimum(w2, w3))) >= 256


@triton.jit
def _local_bounds(first, lo, hi, DT: tl.constexpr):
    """[lo, hi] (global indices, int64) as offsets from first, clamped into [-1, DT] (int32):
    the tests of a tile's DT indices run on int32 offsets."""
    return (tl.minimum(tl.maximum(lo - first, -1), DT).to(tl.int32),
            tl.minimum(tl.maximum(hi - first, -1), DT).to(tl.int32))


@triton.jit
def _spacings(key, stream, first, lo, hi, DT: tl.constexpr):
    """The Exp(1) spacings of global indices first .. first + DT - 1 (first a multiple of 4), 0
    outside [lo, hi], as four (DT / 4,) blocks e0 .. e3: element i of e_j is index
    first + 4 i + j, word j of Philox evaluation first / 4 + i. Kept apart (not joined into one
    block), the words of an evaluation stay in the thread that made them: no layout change
    (shared memory and barriers) between the draws and their sums."""
    rows = tl.arange(0, DT // 4)
    w0, w1, w2, w3 = philox4(key, stream, (first >> 2) + rows.to(tl.int64))
    q = rows * 4
    a, b = _local_bounds(first, lo, hi, DT)
    e0 = tl.where((q >= a) & (q <= b), -tl.log(1.0 - _to_uniform(w0)), 0.0)
    e1 = tl.where((q + 1 >= a) & (q + 1 <= b), -tl.log(1.0 - _to_uniform(w1)), 0.0)
    e2 = tl.where((q + 2 >= a) & (q + 2 <= b), -tl.log(1.0 - _to_uniform(w2)), 0.0)
    e3 = tl.where((q + 3 >= a) & (q + 3 <= b), -tl.log(1.0 - _to_uniform(w3)), 0.0)
    return e0, e1, e2, e3


@triton.jit
def _running(e0, e1, e2, e3):
    """The inclusive running sums, in index order, of a tile's four spacing blocks (element i
    of e_j: tile index 4 i + j): the evaluations before each one, then its words in turn; and
    the evaluations' own sums."""
    row = e0 + e1 + e2 + e3
    v0 = (tl.cumsum(row, 0) - row) + e0
    v1 = v0 + e1
    v2 = v1 + e2
    return v0, v1, v2, v2 + e3, row


@triton.jit(do_not_specialize=SEED_WORDS)
def _sap_partials_kernel(
    x_ptr, seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1, bx_ptr, bd_ptr, draws_ptr, count_ptr,
    L, r, K, NB, D, x_sn, x_sl,
    E: tl.constexpr,
    DT: tl.constexpr,
    STORE: tl.constexpr,
    PB: tl.constexpr,
):
    """Exact mode's partials: element chunk sums of |x| and draw chunk sums of the spacings;
    with STORE (a draw chunk is one tile) also the tile's in-chunk running sums, for the merge
    to read back instead of making the draws again (its STORED tiles). Each program then counts
    itself done for its sample (release); the sample's last one (acquire) makes both prefix
    rows and returns the count to zero (kept counters: triton_kernels/_counters)."""
    pid = tl.program_id(0)
    n = (pid // (K + NB)).to(tl.int64)
    c = pid % (K + NB)
    if c < K:
        offs = c.to(tl.int64) * E + tl.arange(0, E).to(tl.int64)
        a = tl.abs(tl.load(x_ptr + n * x_sn + offs * x_sl, mask=offs < L, other=0.0).to(tl.float32))
        tl.store(bx_ptr + n * (K + 1) + 1 + c, tl.sum(a, 0))
    else:
        key, stream = load_seed(seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1)
        b = (c - K).to(tl.int64)
        base = n * (r + tl.zeros([], tl.int64) + 1)
        first = (base >> 2) * 4 + b * D
        if STORE:
            e0, e1, e2, e3 = _spacings(key, stream, first, base, base + r, DT)
            v0, v1, v2, v3, _ = _running(e0, e1, e2, e3)
            rows = tl.arange(0, DT // 4)
            out = draws_ptr + (n * NB + b) * DT + rows
            tl.store(out, v0)
            tl.store(out + DT // 4, v1)
            tl.store(out + DT // 2, v2)
            tl.store(out + 3 * (DT // 4), v3)
            # The partial: the last running sum (the thread holding it stores it; no reduction).
            tl.store(bd_ptr + n * (NB + 1) + 1 + b + rows * 0, v3, mask=rows == DT // 4 - 1)
        else:
            acc = tl.zeros([], dtype=tl.float32)
            t = b * 0
            while t < D:
                e0, e1, e2, e3 = _spacings(key, stream, first + t, base, base + r, DT)
                acc += tl.sum(e0 + e1 + e2 + e3, 0)
                t += DT
            tl.store(bd_ptr + n * (NB + 1) + 1 + b, acc)
    tl.debug_barrier()  # every thread's stores before the release
    done_ptr = count_ptr + n
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == K + NB - 1:
        # The sample's last partial: every other one is visible (acquire); the count back to
        # zero for the next launch, then the prefix rows in the fixed order.
        tl.atomic_xchg(done_ptr, 0, sem="relaxed")
        _prefix(bx_ptr + n * (K + 1), K, PB)
        _prefix(bd_ptr + n * (NB + 1), NB, PB)


@triton.jit
def _prefix(row, m, PB: tl.constexpr):
    """row[1 .. m] = monotone prefix sums of row[1 .. m], row[0] = 0; row[m] = NaN if a value
    is NaN or inf or the sum overflows. The values, stored by other programs, are loaded past
    L1 (.cg)."""
    tl.store(row, 0.0)
    carry = tl.zeros([], dtype=tl.float32)
    bad = tl.zeros([], dtype=tl.int32)
    t = m * 0
    while t < m:
        idx = t + tl.arange(0, PB)
        inside = idx < m
        v = tl.load(row + 1 + idx, mask=inside, other=0.0, cache_modifier=".cg")
        bad = tl.maximum(bad, tl.max(((v != v) | (v == float("inf"))).to(tl.int32), 0))
        c = tl.maximum(_running_max(tl.cumsum(v, 0) + carry), carry)
        tl.store(row + 1 + idx, c, mask=inside)
        carry = tl.max(c, 0)
        t += PB
    if (bad > 0) | (carry == float("inf")):
        tl.store(row + m, float("nan"))


@triton.jit
def _count_below(ptr, m, t, scale, W: tl.constexpr):
    """How many of ptr[0 .. m) have ptr[i] * scale < t (ptr non-decreasing): a W-ary search,
    log_W(m) steps of W probes each."""
    probes = tl.arange(0, W).to(tl.int64)
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + m
    while lo < hi:
        step = (hi - lo + W - 1) // W
        idx = lo + probes * step
        inside = idx < hi
        below = inside & (tl.load(ptr + idx, mask=inside, other=0.0) * scale < t)
        c = tl.sum(below.to(tl.int64), 0)
        top = tl.minimum(lo + c * step, hi)
        lo = tl.where(c > 0, lo + (c - 1) * step + 1, lo)
        hi = top
    return lo


@triton.jit
def _search(pos_ptr, v, E: tl.constexpr):
    """How many of pos[0 .. E) are <= v (pos non-decreasing, E a power of 2), capped at E - 1:
    branchless, log2(E) dependent gathers."""
    ptr = pos_ptr + tl.zeros(v.shape, dtype=tl.int32)
    for i in tl.static_range(1, 21):
        if (E >> i) > 0:
            probe = tl.load(ptr + ((E >> i) - 1))
            ptr = tl.where(probe <= v, ptr + (E >> i), ptr)
    return ptr


@triton.jit
def _mark(pos_ptr, v, q, q_lo, q_hi, lo, hi, E: tl.constexpr):
    """Marks the element of each draw (at tile offset q, a draw where q_lo <= q <= q_hi;
    position v) that lands in [lo, hi): its hit flag, E floats past its bound in the program's
    scratch slot."""
    inside = (q >= q_lo) & (q <= q_hi) & (v >= lo) & (v < hi)
    tl.store(_search(pos_ptr, v, E) + E, tl.full(v.shape, 1.0, tl.float32), mask=inside)


@triton.jit(do_not_specialize=SEED_WORDS)
def _sap_merge_kernel(
    src_ptr, x_ptr, out_ptr, seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1, bx_ptr, bd_ptr,
    draws_ptr, scratch_ptr,
    L, r, K, NB, D, items,
    x_sn, x_sl, src_sn, src_sl, out_sn, out_sl,
    E: tl.constexpr,
    DT: tl.constexpr,
    W: tl.constexpr,
    STORED: tl.constexpr,
):
    key, stream = load_seed(seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1)
    lanes = tl.arange(0, E)
    slot = tl.program_id(0)
    pos_ptr = scratch_ptr + slot.to(tl.int64) * (2 * E)
    hit_ptr = pos_ptr + E
    r64 = r + tl.zeros([], tl.int64)  # (r may be a constexpr 1)
    item = slot
    while item < items:
        n = (item // K).to(tl.int64)
        k = item % K
        offs = k.to(tl.int64) * E + lanes.to(tl.int64)
        in_row = offs < L
        xv = tl.load(x_ptr + n * x_sn + offs * x_sl, mask=in_row, other=0.0)
        row_b = bx_ptr + n * (K + 1)
        total = tl.load(row_b + K)
        go = (total > 0.0) & (total < float("inf"))
        pre = tl.where(total < _TINY_TOTAL, _TINY_SCALE, 1.0)
        lo = tl.load(row_b + k) * pre
        hi = tl.where(k == K - 1, float("inf"), tl.load(row_b + k + 1) * pre)
        a = tl.abs(xv.to(tl.float32)) * pre
        c = tl.minimum(_running_max(tl.cumsum(a, 0) + lo), hi)
        last = tl.minimum(L - k * E, E) - 1
        c = tl.where(lanes < last, c, tl.where(lanes == last, hi, float("inf")))
        tl.store(pos_ptr + lanes, c)
        tl.store(hit_ptr + lanes, tl.zeros([E], dtype=tl.float32))
        tl.debug_barrier()
        if go:
            row_d = bd_ptr + n * (NB + 1)
            scale = (total * pre) / tl.load(row_d + NB)  # position of S_i in the units of B
            # Draw chunk b's positions are >= P_b * scale (P_b plus non-negative sums), and at
            # most its end P_{b+1} * scale plus the rounding of a tile's cumsum against the
            # partials' sum (<= DT ulps of P): chunks ending below lo by more than 2^-12 of the
            # total, and those starting at or above hi, hold no draw of this chunk.
            b0 = _count_below(row_d + 1, NB, lo - total * pre * _MARGIN, scale, W)
            b1 = _count_below(row_d, NB, hi, scale, W)
            base = n * (r64 + 1)
            start = (base >> 2) * 4
            b = b0
            while b < b1:
                s = tl.load(row_d + b)
                t = b * 0
                while t < D:
                    first = start + b * D + t
                    q = tl.arange(0, DT // 4) * 4
                    if STORED:  # the partials pass's running sums (D == DT)
                        at = draws_ptr + (n * NB + b) * DT + tl.arange(0, DT // 4)
                        v0 = tl.load(at)
                        v1 = tl.load(at + DT // 4)
                        v2 = tl.load(at + DT // 2)
                        v3 = tl.load(at + 3 * (DT // 4))
                    else:
                        e0, e1, e2, e3 = _spacings(key, stream, first, base, base + r64, DT)
                        v0, v1, v2, v3, row = _running(e0, e1, e2, e3)
                    # Draws are indices base .. base + r - 1; positions from the chunk's start s.
                    d_lo, d_hi = _local_bounds(first, base, base + r64 - 1, DT)
                    _mark(pos_ptr, (s + v0) * scale, q, d_lo, d_hi, lo, hi, E)
                    _mark(pos_ptr, (s + v1) * scale, q + 1, d_lo, d_hi, lo, hi, E)
                    _mark(pos_ptr, (s + v2) * scale, q + 2, d_lo, d_hi, lo, hi, E)
                    _mark(pos_ptr, (s + v3) * scale, q + 3, d_lo, d_hi, lo, hi, E)
                    t += DT
                    if not STORED:  # (stored: one tile a chunk)
                        if t < D:  # the next tile of the chunk starts at the sum so far
                            s += tl.sum(row, 0)
                b += 1
        tl.debug_barrier()
        # A zero |x| is reached only through rounding at a chunk's end: never kept. (Without
        # draws, go false, nothing is marked.)
        # src only now (in forward x again, from L1 or L2): not held across the draw loops.
        g = tl.load(src_ptr + n * src_sn + offs * src_sl, mask=in_row, other=0.0)
        kept = (tl.load(hit_ptr + lanes) != 0.0) & (a > 0.0)
        p = a * tl.div_rn(1.0, total * pre)
        q = _keep_probability(p, r, _all_small(p))
        y = tl.where(kept, g.to(tl.float32) / q, g.to(tl.float32) * 0.0)
        tl.store(out_ptr + n * out_sn + offs * out_sl, _round(y, g.dtype), mask=in_row)
        tl.debug_barrier()  # the slot is rewritten by the next item
        item += tl.num_programs(0)


@triton.jit
def _bernoulli_item(t, N, KP, KB, LAG):
    """Item t of the bernoulli launch as (partials, n, c): the partials items c of the first
    LAG samples, then for each later sample n its partials followed by the elementwise items
    of sample n - LAG, then the last LAG samples' elementwise items. A sample's elementwise
    items come after all of its partials and LAG samples of partials later (about half the
    programs resident at once): by the time they start, the partials they wait for are
    mostly done."""
    pair = KP + KB
    lead = LAG * KP
    mid = (N - LAG) * pair
    head = t < lead
    body = (t >= lead) & (t - lead < mid)
    # One division: the item's place in its segment (a sample's partials, a pair, a sample's
    # blocks).
    num = tl.where(head, t, tl.where(body, t - lead, t - lead - mid))
    den = tl.where(head, KP, tl.where(body, pair, KB))
    q = num // den
    rem = num - q * den
    partials = head | (body & (rem < KP))
    n = tl.where(head, q, tl.where(body, tl.where(rem < KP, q + LAG, q), N - LAG + q))
    c = tl.where(body & (rem >= KP), rem - KP, rem)
    return partials, n, c


@triton.jit(do_not_specialize=SEED_WORDS + ("halves",))
def _sap_bernoulli_kernel(
    src_ptr, x_ptr, out_ptr, seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1, part_ptr, count_ptr,
    N, L, r, KP, KB, LAG, halves,
    x_sn, x_sl, src_sn, src_sl, out_sn, out_sl,
    BLOCK: tl.constexpr,
    PB: tl.constexpr,
    WIDE: tl.constexpr,
    ALIGNED: tl.constexpr,
    SAME: tl.constexpr,
    HW_RCP: tl.constexpr,
):
    """Bernoulli mode in one launch of N (KP + KB) items, taken in ticket order (an atomic counter:
    an item's program starts only after those of every earlier item did, so waiting on earlier
    items cannot deadlock, on the GPU or in the interpreter's in-order run). A partials item
    (sample n, chunk c of 2 halves blocks) stores sum |x| and max |x| of its chunk, then counts
    itself done for the sample (release); an elementwise item (n, c) waits until the sample's KP
    partials are done (acquire), sums them in a fixed order (the same in every item of the
    sample) and writes its `halves` blocks of BLOCK elements (a runtime count: one compiled
    kernel for any): element j of sample n (global value n L + j, in the Philox group of counter
    (n L + j) / 4) kept with probability q, out = src / q, else src * 0. The partials items of
    later samples stream x from HBM while the elementwise items, issue-bound, compute (one
    launch overlaps both), and an item reads x again about half a wave of programs after its
    partials did: from L2. Offsets inside a row are int32 (j * stride, the launcher's WIDE =
    False: every row's extent fits) or int64; SAME: src is x (forward), loaded once (a
    runtime flag made the loaded x a copy in registers: 16 moves a block). ALIGNED
    (L % 4 == 0): every row starts a Philox group, so a thread's 4 elements of a group are 4
    consecutive elements of its row from a multiple of 4, and the compiler, given unit strides
    and 16-byte aligned rows (as the JIT specializes them), loads and stores them in 16-byte
    accesses (4-byte ones otherwise: ~20 lane instructions an element fewer in the sm_90 SASS).
    The sample's max |x| decides the log1p path for all of its items at once (every p below
    2^-7: the series alone; with no 2^64 scale as well, p = |x| / total in one multiply).
    src / q is src times the hardware reciprocal of q (HW_RCP; _normal_quotient) in every block
    with no uniform of 0, whose kept divisors are all normal numbers; a block with one divides
    its elements of u = 0 again in full."""
    ticket = tl.atomic_add(count_ptr, 1, sem="relaxed")
    if ticket == tl.num_programs(0) - 1:  # every ticket taken: the counter back to zero
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")
    partials, n32, c = _bernoulli_item(ticket, N, KP, KB, LAG)
    n = n32.to(tl.int64)
    part = part_ptr + (n * KP) * 2
    done_ptr = count_ptr + 1 + n32
    if partials:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        top = tl.zeros([BLOCK], dtype=tl.float32)
        h = halves * 0  # (runtime loops are while loops: see triton_kernels/cas.py)
        while h < 2 * halves:
            offs = (c * (2 * halves) + h) * BLOCK + tl.arange(0, BLOCK)
            if WIDE:
                offs = offs.to(tl.int64)
            a = tl.abs(tl.load(x_ptr + n * x_sn + offs * x_sl, mask=offs < L, other=0.0)
                       .to(tl.float32))
            acc += a
            top = tl.maximum(top, a)
            h += 1
        chunk_sum, chunk_max = tl.reduce((acc, top), 0, _sum_max)
        tl.store(part + 2 * c, chunk_sum)
        tl.store(part + 2 * c + 1, chunk_max)
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(done_ptr, 1, sem="release")
    else:
        done = tl.atomic_add(done_ptr, 0, sem="acquire")
        while done < KP:
            done = tl.atomic_add(done_ptr, 0, sem="acquire")
        # Counted past the wait; the sample's last item to pass returns the count to zero.
        if tl.atomic_add(done_ptr, 1, sem="relaxed") == KP + KB - 1:
            tl.atomic_xchg(done_ptr, 0, sem="relaxed")
        key, stream = load_seed(seed_ptr, seed_k0, seed_k1, seed_s0, seed_s1)
        # The total from the partials in a fixed order (the same in every item of the sample);
        # NaN propagates, and an overflow to inf gives p = 0: nothing is kept.
        total = tl.zeros([], dtype=tl.float32)
        big = tl.zeros([], dtype=tl.float32)
        t = KP * 0
        if KP <= _FEW_PARTIALS:  # one after another, each a load every thread makes alike
            while t < KP:
                total += tl.load(part + 2 * t, cache_modifier=".cg")
                big = tl.maximum(big, tl.load(part + 2 * t + 1, cache_modifier=".cg"))
                t += 1
        else:  # PB at a time, summed across the block
            while t < KP:
                idx = t + tl.arange(0, PB)
                sums = tl.load(part + 2 * idx, mask=idx < KP, other=0.0, cache_modifier=".cg")
                maxima = tl.load(part + 2 * idx + 1, mask=idx < KP, other=0.0,
                                 cache_modifier=".cg")
                block_sum, block_max = tl.reduce((sums, maxima), 0, _sum_max)
                total += block_sum
                big = tl.maximum(big, block_max)
                t += PB
        pre = tl.where(total < _TINY_TOTAL, _TINY_SCALE, 1.0)
        inv = tl.div_rn(1.0, total * pre)
        # p = |x| pre inv is monotone in |x|: the largest p is the max's (NaN: not small).
        all_small = big * pre * inv < _SMALL_P
        # The fast path of a realistic sample: every p from the series, and pre = 1 (p = |x| inv,
        # the same bits as |x| pre inv): one multiply an element less.
        plain = all_small & (pre == 1.0)
        rf = r * 1.0  # (r may be a constexpr 1: a launch specializes it)
        origin = n * L  # uniform index of element 0
        lanes = tl.arange(0, BLOCK // 4)
        h = halves * 0
        while h < halves:
            k = c.to(tl.int64) * halves + h  # the sample's block
            rows = (origin >> 2) + k * (BLOCK // 4) + lanes.to(tl.int64)
            u, positive = _uniforms4(key, stream, rows)
            # j = 4 rows + i - origin = k BLOCK - origin % 4 + 4 lane + i (-3 <= j < L + BLOCK).
            j = (k * BLOCK).to(tl.int32) + lanes[:, None] * 4 + tl.arange(0, 4)[None, :]
            if ALIGNED:  # L % 4 == 0: every row starts a Philox group (origin % 4 == 0)
                in_row = j < L
            else:
                j -= (origin & 3).to(tl.int32)
                in_row = (j >= 0) & (j < L)
            if WIDE:
                j = j.to(tl.int64)
            xv = tl.load(x_ptr + n * x_sn + j * x_sl, mask=in_row, other=0.0)
            if SAME:
                g = xv
            else:
                g = tl.load(src_ptr + n * src_sn + j * src_sl, mask=in_row, other=0.0)
            a = tl.abs(xv.to(tl.float32))
            if plain:
                q = _neg_expm1(rf * _log1p_neg_series(a * inv))
            else:
                q = _keep_probability(a * pre * inv, r, all_small)
            gf = g.to(tl.float32)
            # A kept element has u < q, and a u above 0 is at least 2^-24, so only an element
            # of u = 0 can be kept with a divisor below 2^-126: where a block has one (~1 block
            # in 4000), its elements of u = 0 are divided again in full. (Tested on u and q
            # themselves, not on u < q: that predicate would be kept alive across the branch.)
            y = tl.where(u < q, _normal_quotient(gf, q, HW_RCP), gf * 0.0)
            if not positive:
                y = tl.where((u == 0.0) & (q > 0.0), gf / q, y)
            tl.store(out_ptr + n * out_sn + j * out_sl, _round(y, g.dtype), mask=in_row)
            h += 1


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (one shape and dtype) view the same elements."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _chunk_sizes(L: int, r: int) -> tuple[int, int]:
    """(E, D): elements per element chunk and draws per draw chunk, from (L, r) only."""
    e = _E_LARGE if L >= _E_LARGE_FROM else _E_SMALL
    return e, _DT * next_pow2(math.ceil((r + 4) / (_DT * _MAX_DRAW_CHUNKS)))


def _stores_draws(L: int, r: int, d: int, dt: int) -> bool:
    """Whether exact mode keeps the draws' running sums (the partials pass writes them, the
    merge reads them back): where a draw chunk is one tile and r <= _STORE_MAX_RATIO * L."""
    return d == dt and r <= _STORE_MAX_RATIO * L


def _config(L: int, r: int, exact: bool) -> dict:
    """Every launch's constexprs and warps (the AOT list holds each one the launcher can pick)."""
    e, d = _chunk_sizes(L, r)
    store = exact and _stores_draws(L, r, d, _DT)
    return {"partials": {"E": e, "DT": _DT, "STORE": store, "PB": _PARTIALS_PREFIX_BLOCK},
            "merge": {"E": e, "DT": _DT, "W": _SEARCH_WIDTH, "STORED": store}}


def bernoulli_block(L: int) -> int:
    """The bernoulli launch's BLOCK for rows of L elements: the smallest of _BERNOULLI_BLOCKS
    that holds a row with its first Philox group, else the largest."""
    span = L + (3 if L % 4 else 0)
    return next(b for b in _BERNOULLI_BLOCKS if span <= b or b == _BERNOULLI_BLOCK)


def bernoulli_config(N: int, L: int, block: int | None = None) -> dict:
    """The bernoulli launch's shape for (N, L): HALVES (blocks an elementwise item: the most of
    4, 2, 1 that a row fills more than half of and whose items alone still give every SM one;
    a partials item covers two items' elements), KP partials and KB elementwise items a
    sample (rows with L % 4 != 0 start inside a Philox group: up to 3 elements more), the LAG
    in samples between a sample's partials and its blocks (one item an SM, half the programs
    resident at once: more lets the elementwise items wait less often, and delays the first
    ones longer), and the grid. ``block``: bernoulli_block(L) unless given."""
    block = bernoulli_block(L) if block is None else block
    halves = next(h for h in (4, 2, 1) if h == 1 or (L > h // 2 * block
                                                and N * cdiv(L, h * block) >= _SMS))
    item = halves * block
    kp = cdiv(L, 2 * item)
    kb = cdiv(L + (3 if L % 4 else 0), item)
    lag = min(N, cdiv(_SMS, kp + kb))
    return {"HALVES": halves, "KP": kp, "KB": kb, "LAG": lag, "programs": N * (kp + kb)}


def sap_forward(src: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, r: int, exact: bool,
                *, _chunks: tuple[int, int, int] | None = None, _slots: int = _SLOTS,
                _host_seed: bool | None = None, _store: bool | None = None,
                _block: int | None = None, _lag: int | None = None) -> torch.Tensor:
    """src / q where the draws (from x, the seed's stream) keep an element, else 0; src is x in
    forward and grad in backward. Tests move the chunk boundaries with ``_chunks`` = (E, D, DT)
    (exact mode; powers of 2, DT >= 4 dividing D; exact-mode positions then round
    differently), the merge's persistent programs with ``_slots``, the seed's path (on x's
    device or the host: _random.seed_args) with ``_host_seed``, whether exact mode stores the
    draws (``_store``; only where a draw chunk is one tile), and bernoulli mode's block
    (``_block``, a power of 2 >= 16, instead of bernoulli_block(L); a sample's total is summed
    over other chunks then, so
    results move by rounding) and lag (``_lag``, 1 to N samples)."""
    if x.dim() != 2 or src.shape != x.shape:
        raise ValueError(f"sap (triton): x must be a 2-D (N, L) view and src of its shape, got "
                         f"x {tuple(x.shape)}, src {tuple(src.shape)}")
    if x.dtype not in _TL_DTYPES or src.dtype != x.dtype:
        raise TypeError(f"sap (triton): x must be float32, float16 or bfloat16 (src alike), got {x.dtype}")
    seed = seed_args(seed, x.device, "sap", _host_seed)
    if r < 1:
        raise ValueError(f"sap (triton): r must be >= 1, got {r}")
    if _store and not exact:
        raise ValueError("sap (triton): stored draws need exact mode and one tile a chunk")
    out = torch.empty_like(src)
    if x.numel() == 0:
        return out
    if not exact:
        _bernoulli(src, x, out, seed, r, _block, _lag)
        return out
    N, L = x.shape
    cfg = _config(L, r, exact)
    e, d = _chunk_sizes(L, r)
    dt = _DT
    if _chunks is not None:
        e, d, dt = _chunks
        store = _stores_draws(L, r, d, dt)
        cfg["partials"] = {**cfg["partials"], "E": e, "DT": dt, "STORE": store}
        cfg["merge"] = {**cfg["merge"], "E": e, "DT": dt, "STORED": store}
    if _store is not None:
        if _store and d != dt:
            raise ValueError("sap (triton): stored draws need exact mode and one tile a chunk")
        cfg["partials"]["STORE"] = cfg["merge"]["STORED"] = _store
    k = cdiv(L, e)
    nb = cdiv(r + 4, d)
    bx = torch.empty((N, k + 1), dtype=torch.float32, device=x.device)
    bd = torch.empty((N, nb + 1), dtype=torch.float32, device=x.device)
    # The draws' running sums, a chunk's DT in a row (stored mode): at most _STORE_MAX_RATIO
    # floats an element of x (eager's multinomial alone takes 8 bytes a draw).
    draws = (torch.empty((N, nb * d), dtype=torch.float32, device=x.device)
             if cfg["partials"]["STORE"] else bd)
    with on_device(x):
        # Each sample's count of partials done: zero, and left zero by the launch.
        with counters(x.device, N) as count:
            _sap_partials_kernel[(N * (k + nb),)](
                x, *seed, bx, bd, draws, count, L, r, k, nb, d, *x.stride(),
                **cfg["partials"], num_warps=_WARPS["partials"])
        items = N * k
        slots = min(items, _slots)
        scratch = torch.empty((slots, 2 * e), dtype=torch.float32, device=x.device)
        _sap_merge_kernel[(slots,)](
            src, x, out, *seed, bx, bd, draws, scratch, L, r, k, nb, d, items,
            *x.stride(), *src.stride(), *out.stride(), **cfg["merge"], num_warps=_WARPS["merge"],
            maxnreg=_MERGE_MAX_REGS[cfg["merge"]["STORED"]])
    return out


def _bernoulli(src: torch.Tensor, x: torch.Tensor, out: torch.Tensor, seed: tuple, r: int,
               block: int | None, lag: int | None) -> None:
    """Bernoulli mode: one launch (_sap_bernoulli_kernel), on counters it leaves zero."""
    N, L = x.shape
    block = bernoulli_block(L) if block is None else block
    cfg = bernoulli_config(N, L, block)
    if lag is not None:
        if not 1 <= lag <= N:
            raise ValueError(f"sap (triton): the bernoulli lag must be in [1, {N}], got {lag}")
        cfg["LAG"] = lag
    # int32 offsets where j * stride stays below 2^31 for every j < L + a partials item
    extent = (L + 2 * cfg["HALVES"] * block) * max(abs(t.stride(1)) for t in (x, src, out))
    wide = extent >= _WIDE_FROM
    # (sum |x|, max |x|) of each partials item; the ticket and each sample's done count.
    part = torch.empty((N, cfg["KP"], 2), dtype=torch.float32, device=x.device)
    with on_device(x):
        # Zero, and left zero by the launch: no fill launch before it (triton_kernels/_counters).
        with counters(x.device, N + 1) as count:
            _sap_bernoulli_kernel[(cfg["programs"],)](
                src, x, out, *seed, part, count, N, L, r, cfg["KP"], cfg["KB"], cfg["LAG"],
                cfg["HALVES"], *x.stride(), *src.stride(),
                *out.stride(), BLOCK=block, PB=_PREFIX_BLOCK, WIDE=wide,
                ALIGNED=L % 4 == 0 and not wide, SAME=_aliases(src, x), HW_RCP=not INTERPRETED,
                num_warps=_WARPS["bernoulli"],
                maxnreg=_BERNOULLI_MAX_REGS)


def _aot_variants() -> list[tuple]:
    from .aot import signature

    variants = []
    ws = {"seed_ptr": "*i64", "bx_ptr": "*fp32", "bd_ptr": "*fp32", "draws_ptr": "*fp32",
          "scratch_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32"}
    for dtype in _TL_DTYPES.values():
        for e in (_E_SMALL, _E_LARGE):
            cfg = _config(e if e == _E_SMALL else _E_LARGE_FROM, 1, True)
            for kernel, name, flag in ((_sap_partials_kernel, "partials", "STORE"),
                                       (_sap_merge_kernel, "merge", "STORED")):
                for store in (False, True):
                    opts = {"num_warps": _WARPS[name]}
                    if kernel is _sap_merge_kernel:
                        opts["maxnreg"] = _MERGE_MAX_REGS[store]
                    constexprs = {**cfg[name], flag: store}
                    variants.append((kernel, signature(kernel, dtype, constexprs, ws), constexprs,
                                     opts))
        # (int64 offsets take the unaligned path: aligned, they spill at 128 registers)
        for block, (wide, aligned), same in itertools.product(
                _BERNOULLI_BLOCKS, ((False, False), (False, True), (True, False)), (False, True)):
            constexprs = {"BLOCK": block, "PB": _PREFIX_BLOCK, "WIDE": wide,
                          "ALIGNED": aligned, "SAME": same, "HW_RCP": True}
            variants.append((_sap_bernoulli_kernel,
                             signature(_sap_bernoulli_kernel, dtype, constexprs, ws), constexprs,
                             {"num_warps": _WARPS["bernoulli"], "maxnreg": _BERNOULLI_MAX_REGS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
