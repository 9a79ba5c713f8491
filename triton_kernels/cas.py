"""CAS Triton kernels and launchers (contract: csrc/ops.cpp, csrc/cpu/cas.cpp).

x is an (N, K, L) view with any strides (L = H * W); weight (C, K). The design follows
csrc/cuda/cas.cu: every sample is split over many programs, so the grid fills the GPU at any
batch size, and no float atomics are used anywhere (results are bitwise repeatable).

Forward, training (a label given): one streaming launch and one asynchronous assert (up to 64
classes; more: a logits launch between them).
  1. _cas_stream_kernel over a 1-D grid of (sample, block of channels, chunk of L) tiles: one
     pass over x writes out = x * weight[label] and each tile's per-channel sums to a workspace
     part (N, K, S) (S chunks of L per channel). Up to 64 classes the sample's last program to
     finish (a count per sample, in counters the launch leaves zero: triton_kernels/_counters,
     no fill launch) forms the sample's means from the S partials in a fixed order, logits =
     mean @ weight.T + bias rounded to x's dtype, and index = label (_sample_logits); a label
     outside [0, C) marks the batch, and the last sample to finish sets the flag (1 where none
     is marked);
  2. more classes: program 0 of the stream sets the flag; _cas_logits_kernel per (16 samples,
     16 classes) forms the means and logits the same way (on tl.dot, IEEE float32) and clears
     the flag on a bad label;
  3. torch._assert_async on the flag: a bad label fails without the host waiting (the stream
     reads no weight row for it). CPU labels, under the interpreter, are also read on the host
     by the op (pyprune/ops/cas.py), which names the bad value.
Forward, inference: the stream in sums-only mode with the logits and the argmax (first index on
ties, NaN largest) in each sample's last program (more classes: the logits launch, then
_cas_argmax_kernel, a program per sample over the stored, rounded logits), then the stream in
write-only mode: out = x * weight[index] (x read twice; the second read hits L2 where x fits).
Backward: _cas_backward_kernel on the same split grid: grad_x = grad_out * weight[index] + a / L
and the per-tile channel sums of grad_out * x, from one pass over both, where a = grad_logits @
weight (the program's channels of its sample's row) is formed in the kernel where that takes a
few steps of a weight tile no larger than the streaming tile (from L2; up to 64 classes for NCHW
maps of 16 pixels or more), else by one small GEMM before it.
_cas_gather_kernel forms grad_weight = grad_logits.T @ mean plus the sums t of each class's
samples (t summed from the S partials in chunk order), per block of classes over the samples
in order (index_add_ would use atomics on the GPU), both on tl.dot, and grad_bias =
grad_logits.sum(0) in the same loop: two launches in all (three with the GEMM).

Tiles: (BLOCK_K, BLOCK_L) with the contiguous dimension inner (L for NCHW and general strides,
K for channels_last), 8 elements a thread; the JIT specializes unit strides and 16-byte
divisible strides and pointers, so the inner dimension moves in 16-byte vectors where the layout
allows. Each program loads its whole tile before it stores anything.

`mode`, `train` and `has_bias` are runtime int32 flags, not constexprs: they cost a uniform
branch, and keep the variants to compile (and the AOT list) small. Loops over runtime bounds are
`while` loops (Triton 3.6's interpreter cannot take a runtime bound in range() with numpy >= 2.4).
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ._counters import counters
from .aot import signature

# Streaming tiles: the inner (contiguous) extent is the smallest of _INNER >= min(extent, 256);
# a tile holds _TILES[-1] elements, halved (down to _TILES[0]) while the grid has fewer than
# _FILL programs or the tile outgrows the outer extent. num_warps = elements / 256: 8 a thread.
_INNER = (1, 4, 16, 64, 256)
_TILES = (512, 1024, 2048)
_FILL = 2 * 132  # programs that fill an H100/H200 (132 SMs) twice over
_ELEMS_PER_WARP = 256
# The logits launch (more than _FUSED_CLASSES classes): 16 samples and 16 classes a program,
# _WIDE_CHANNELS channels a step (half as many with 4 partials a channel, which spilled on sm_80
# at 128), the product on tl.dot (IEEE float32: a sum of products of a 3-D tile took 88 us for
# 32 samples x 2048 channels x 1000 classes on an H200), 8 warps; a step sums _CHUNKS partials
# of each channel (more chunks take more steps: a larger step spilled).
_LOGITS_WARPS = 8
_WIDE_SAMPLES = 16
_WIDE_CLASSES = 16
_WIDE_CHANNELS = 128
_CHUNKS = (1, 4)
_ARGMAX_BLOCK = 1024
# Backward: the stream forms a = grad_logits @ weight itself, instead of a GEMM launch before it,
# where that takes at most _FUSED_MAX_STEPS steps of FUSED_STEP classes (_fused_step: a tile of
# FUSED_STEP weight rows by the program's channels, from L2, no larger than the program's
# streaming tile, so that no variant spills; at most _FUSED_MAX_STEP rows): up to 64 classes
# where a program's tile spans 16 or more positions (NCHW maps of 16 pixels or more), fewer for
# the wide channel tiles of channels_last and of smaller maps.
_FUSED_MAX_STEP = 16
_FUSED_MAX_STEPS = 4
# Forward: up to _FUSED_CLASSES classes, the streaming pass forms each sample's logits in the
# sample's last program (_sample_logits: a (TAIL_C, LOGIT_K) weight tile a step, half the
# streaming tile's size; TAIL_C classes of _TAIL_CLASSES, the fewest that hold C, so that few
# classes take few, wide steps over the channels), instead of a logits launch after it.
_FUSED_CLASSES = 64
_TAIL_CLASSES = (16, _FUSED_CLASSES)
# A launch whose warps all fit on an H100 / H200 at once even at MAX_REGS registers a thread
# (_ONE_WAVE warps: 16 an SM of 132; small batches) runs the tail on a weight tile of
# _WIDE_TAIL elements a step instead (16 a thread at 2 warps, 8 at 4): the tail, one program's
# serial chain of L2 round trips, is then most of the launch, and its registers (up to 105
# against 64-78 at 2 warps, sm_90) cost no wave. 512 channels and 10 classes: 8 steps instead
# of 32.
_ONE_WAVE = 132 * 16
_WIDE_TAIL = 1024
_TAIL_S = tl.constexpr(4)
# grad_weight's gather: 16-64 classes and 32 channels a program (8 warps), the samples 16 at a
# time (tl.dot's least inner dimension), their S partials _GATHER_S at a time (loads issued
# together, then added in chunk order: one L2 round trip for up to _GATHER_S chunks, not one a
# chunk).
_GATHER_N = 16
_GATHER_K = 32
_GATHER_S = tl.constexpr(4)  # (the kernel's loads are written out for 4)
_GATHER_WARPS = 8
# Registers per thread of every CAS and masked-convolution launch (Triton's maxnreg): 128 keeps
# a block of any size at >= 25% occupancy on sm_80 / sm_90, and an explicit cap also keeps ptxas
# from spilling to reach a smaller register count of its own choosing. The tiles and warps of
# the launchers fit it without spills (make gpu-report: benchmarks/results/sm_90-resources.md).
MAX_REGS = 128
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Stream modes.
_TRAIN, _SUMS, _WRITE = 0, 1, 2


@triton.jit
def _round(v, dtype: tl.constexpr):
    """float32 v in dtype, rounded to nearest even: the interpreter truncates float32 to
    bfloat16, so there bfloat16 is rounded by hand; the GPU's conversion rounds to nearest even
    itself (one instruction, where the hand rounding cost registers)."""
    if (dtype == tl.bfloat16) and _ROUND_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(dtype)


@triton.jit
def _tile(pid, K, L, S, k_blocks, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """Program pid's sample n, chunk s, channels kk and positions ll (and their masks)."""
    s = pid % S
    rest = pid // S
    n = rest // k_blocks
    kk = (rest % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    ll = s * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    kmask = kk < K
    return n, s, kk, ll, kmask, kmask[:, None] & (ll < L)[None, :]


@triton.jit(do_not_specialize=["mode", "fused", "has_bias"])
def _cas_stream_kernel(
    x_ptr, w_ptr, sel_ptr, out_ptr, part_ptr, flag_ptr,
    b_ptr, logits_ptr, index_ptr, mean_ptr, count_ptr,
    N, K, L, C, S, k_blocks, mode, fused, has_bias,
    x_sn, x_sk, x_sl,
    out_sn, out_sk, out_sl,
    w_sc, w_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    TAIL_C: tl.constexpr,
    LOGIT_K: tl.constexpr,
):
    """mode 0 (train): out = x * w[sel[n]] and the sums; 1: the sums only; 2: out only.
    Unfused, in train mode program 0 sets flag[0] = 1 (the logits kernel clears it on a bad
    label). `fused` (up to _FUSED_CLASSES classes; modes 0 and 1): the sample's last program
    to store its sums (count[n], an acq_rel add after the block's stores) forms the sample's
    means, logits and index itself (_sample_logits), instead of a logits launch; count
    (N + 2 zeros, each returned to zero by its last user: _counters) also holds the samples
    done (count[N]) and a bad-label mark (count[N + 1]), and the last sample's tail sets
    flag[0] to 1 where no label was bad, else 0."""
    pid = tl.program_id(0).to(tl.int64)
    n, s, kk, ll, kmask, mask = _tile(pid, K, L, S, k_blocks, BLOCK_K, BLOCK_L)
    raw = tl.load(x_ptr + n * x_sn + kk[:, None] * x_sk + ll[None, :] * x_sl, mask=mask,
                  other=0.0)
    xf = raw.to(tl.float32)
    if mode == 0:
        if fused == 0:
            if pid == 0:
                tl.store(flag_ptr, 1)
    # sel is the label (train) or the index the logits stored (write); in sums mode it is not
    # written yet, so it is not read. A label out of range reads no weight row (its sample's
    # out is 0) and fails the launcher's assert on the flag.
    writes = mode != 1
    c = tl.load(sel_ptr + n, mask=writes, other=0)
    valid = writes & (c >= 0) & (c < C)
    m = tl.load(w_ptr + c * w_sc + kk * w_sk, mask=kmask & valid, other=0.0).to(tl.float32)
    if writes:
        tl.store(out_ptr + n * out_sn + kk[:, None] * out_sk + ll[None, :] * out_sl,
                 _round(xf * m[:, None], raw.dtype), mask=mask)
    if mode != 2:
        tl.store(part_ptr + (n * K + kk) * S + s, tl.sum(xf, 1), mask=kmask)
        if fused != 0:
            # After the tile's stores, so that nothing of the tile stays live across the
            # tail (the kernel's registers are the larger of the two, not their sum).
            tl.debug_barrier()  # every thread's sums stored before the release
            done = tl.atomic_add(count_ptr + n, 1, sem="acq_rel")
            if done == k_blocks * S - 1:  # the sample's last program: its count back to zero
                tl.atomic_xchg(count_ptr + n, 0, sem="relaxed")
                _sample_logits(n, w_ptr, b_ptr, part_ptr, sel_ptr, logits_ptr, index_ptr,
                               mean_ptr, count_ptr, flag_ptr, N, K, L, C, S, mode == 0,
                               has_bias, w_sc, w_sk, TAIL_C, LOGIT_K)


@triton.jit
def _sample_logits(n, w_ptr, b_ptr, part_ptr, label_ptr, logits_ptr, index_ptr, mean_ptr,
                   count_ptr, flag_ptr, N, K, L, C, S, train, has_bias, w_sc, w_sk,
                   TAIL_C: tl.constexpr, LOGIT_K: tl.constexpr):
    """The fused stream's tail for sample n (up to _FUSED_CLASSES classes): its K means from
    the S partials of each channel (a fixed order, from L2), logits = mean @ weight.T + bias,
    LOGIT_K channels a step, rounded to the logits' dtype; train: index = label, a label
    outside [0, C) marks count[N + 1], and the sample that completes the batch (count[N])
    sets the flag where no sample marked it; inference: index = the argmax (first index on
    ties, NaN largest)."""
    cc = tl.arange(0, TAIL_C)
    cmask = cc < C
    ks = tl.arange(0, LOGIT_K).to(tl.int64)
    inv_l = 1.0 / (L * 1.0)
    lg = tl.zeros([TAIL_C], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        kk = k0 + ks
        kmask = kk < K
        # The S partials of each channel, _TAIL_S chunks' loads at once (one L2 round trip
        # for up to _TAIL_S chunks), in a fixed order.
        acc = tl.zeros([LOGIT_K, _TAIL_S], dtype=tl.float32)
        s0 = 0
        while s0 < S:
            sv = s0 + tl.arange(0, _TAIL_S)
            acc += tl.load(part_ptr + (n * K + kk)[:, None] * S + sv[None, :],
                           mask=kmask[:, None] & (sv < S)[None, :], other=0.0,
                           cache_modifier=".cg")
            s0 += _TAIL_S
        mean = tl.sum(acc, 1) * inv_l
        tl.store(mean_ptr + n * K + kk, mean, mask=kmask)
        w = tl.load(w_ptr + cc[:, None] * w_sc + kk[None, :] * w_sk,
                    mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        lg += tl.sum(w * mean[None, :], 1)
        k0 += LOGIT_K
    lg += tl.load(b_ptr + cc, mask=cmask & (has_bias != 0), other=0.0).to(tl.float32)
    rounded = _round(lg, logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + n * C + cc, rounded, mask=cmask)
    if train:
        label = tl.load(label_ptr + n)
        bad = (label < 0) | (label >= C)
        if bad:
            tl.atomic_or(count_ptr + N + 1, 1, sem="relaxed")
        tl.store(index_ptr + n, label)
        # The mark (program order) before the release; the batch's last sample acquires
        # every sample's mark through the count's release sequence.
        finished = tl.atomic_add(count_ptr + N, 1, sem="acq_rel")
        if finished == N - 1:  # the batch's last sample: the flag, both counts back to zero
            marked = tl.atomic_xchg(count_ptr + N + 1, 0, sem="relaxed")
            tl.atomic_xchg(count_ptr + N, 0, sem="relaxed")
            tl.store(flag_ptr, tl.where(marked == 0, 1, 0).to(tl.int32))
    else:
        best_v = tl.full([1], -float("inf"), tl.float32)
        best_i = tl.zeros([1], dtype=tl.int64)
        found_nan = tl.zeros([1], dtype=tl.int32)
        best_v, best_i, found_nan = _argmax_step(rounded.to(tl.float32)[None, :],
                                                 cc.to(tl.int64), cmask, best_v, best_i,
                                                 found_nan, C)
        tl.store(index_ptr + n + tl.zeros([1], dtype=tl.int64), best_i)


@triton.jit
def _argmax_step(v, cc, cmask, best_v, best_i, found_nan, C):
    """The running argmax of rows of rounded logits v (R, BLOCK) over class ids cc (BLOCK,),
    blocks taken in increasing class order: first index on ties, the first NaN largest."""
    is_nan = (v != v) & cmask[None, :]
    nan_i = tl.min(tl.where(is_nan, cc[None, :], C), 1)
    vals = tl.where(cmask[None, :] & (v == v), v, -float("inf"))
    v_max = tl.max(vals, 1)
    max_i = tl.min(tl.where(cmask[None, :] & (vals == v_max[:, None]), cc[None, :], C), 1)
    block_nan = nan_i < C
    take = (found_nan == 0) & (block_nan | (v_max > best_v))
    best_i = tl.where(take, tl.where(block_nan, nan_i, max_i), best_i)
    best_v = tl.where(take, v_max, best_v)
    found_nan = tl.where(block_nan, 1, found_nan)
    return best_v, best_i, found_nan


@triton.jit(do_not_specialize=["train", "has_bias"])
def _cas_logits_kernel(
    w_ptr, b_ptr, part_ptr, label_ptr, logits_ptr, index_ptr, mean_ptr, flag_ptr,
    N, K, L, C, S, c_blocks, train, has_bias,
    w_sc, w_sk,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % c_blocks
    ns = (pid // c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = ns < N
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cc < C
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    ss = tl.arange(0, BLOCK_S).to(tl.int64)
    inv_l = 1.0 / (L * 1.0)  # (L may be a constexpr 1: a launch specializes it)
    lg = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        kk = k0 + ks
        kmask = kk < K
        rmask = nmask[:, None] & kmask[None, :]
        rows = (ns[:, None] * K + kk[None, :]) * S
        w = tl.load(w_ptr + cc[:, None] * w_sc + kk[None, :] * w_sk,
                    mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        # The S partials of each channel, in chunk order.
        acc = tl.zeros([BLOCK_N, BLOCK_K, BLOCK_S], dtype=tl.float32)
        s0 = 0
        while s0 < S:
            sv = s0 + ss
            acc += tl.load(part_ptr + rows[:, :, None] + sv[None, None, :],
                           mask=rmask[:, :, None] & (sv < S)[None, None, :], other=0.0)
            s0 += BLOCK_S
        mean = tl.sum(acc, 2) * inv_l
        tl.store(mean_ptr + ns[:, None] * K + kk[None, :], mean, mask=rmask & (cb == 0))
        lg = tl.dot(mean, tl.trans(w), lg, input_precision="ieee")
        k0 += BLOCK_K
    lg += tl.load(b_ptr + cc, mask=cmask & (has_bias != 0), other=0.0).to(tl.float32)[None, :]
    rounded = _round(lg, logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + ns[:, None] * C + cc[None, :], rounded,
             mask=nmask[:, None] & cmask[None, :])
    if train != 0:
        label = tl.load(label_ptr + ns, mask=nmask & (cb == 0), other=0)
        bad = nmask & (cb == 0) & ((label < 0) | (label >= C))
        # Every lane that sees a bad label stores the same 0: the order does not matter.
        tl.store(flag_ptr + tl.zeros([BLOCK_N], dtype=tl.int64),
                 tl.zeros([BLOCK_N], dtype=tl.int32), mask=bad)
        tl.store(index_ptr + ns, label, mask=nmask & (cb == 0))


@triton.jit
def _cas_argmax_kernel(logits_ptr, index_ptr, C, BLOCK: tl.constexpr):
    """index[n] = argmax of sample n's stored logits, classes in blocks of BLOCK."""
    n = tl.program_id(0).to(tl.int64)
    best_v = tl.full([1], -float("inf"), tl.float32)
    best_i = tl.zeros([1], dtype=tl.int64)
    found_nan = tl.zeros([1], dtype=tl.int32)
    c0 = 0
    while c0 < C:
        cc = c0 + tl.arange(0, BLOCK).to(tl.int64)
        cmask = cc < C
        v = tl.load(logits_ptr + n * C + cc, mask=cmask, other=0.0).to(tl.float32)
        best_v, best_i, found_nan = _argmax_step(v[None, :], cc, cmask, best_v, best_i,
                                                 found_nan, C)
        c0 += BLOCK
    tl.store(index_ptr + n + tl.zeros([1], dtype=tl.int64), best_i)


@triton.jit(do_not_specialize=["fused"])
def _cas_backward_kernel(
    g_ptr, x_ptr, w_ptr, a_ptr, gl_ptr, index_ptr, gx_ptr, part_ptr,
    K, L, C, S, k_blocks, fused,
    g_sn, g_sk, g_sl,
    x_sn, x_sk, x_sl,
    gx_sn, gx_sk, gx_sl,
    w_sc, w_sk,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    FUSED_STEP: tl.constexpr,
):
    """grad_x = grad_out * w[index[n]] + a / L, and the tile's channel sums of grad_out * x.
    a = grad_logits[n] @ weight[:, kk] (the logits' gradient, spread over the channel): read
    from a_ptr, or, where `fused`, formed here from grad_logits (gl_ptr, (N, C) float32) and
    the weight's columns, FUSED_STEP classes a step, so that no GEMM launch precedes the
    stream."""
    pid = tl.program_id(0).to(tl.int64)
    n, s, kk, ll, kmask, mask = _tile(pid, K, L, S, k_blocks, BLOCK_K, BLOCK_L)
    g = tl.load(g_ptr + n * g_sn + kk[:, None] * g_sk + ll[None, :] * g_sl, mask=mask,
                other=0.0)
    x = tl.load(x_ptr + n * x_sn + kk[:, None] * x_sk + ll[None, :] * x_sl, mask=mask,
                other=0.0).to(tl.float32)
    index = tl.load(index_ptr + n)
    tl.device_assert((index >= 0) & (index < C), "cas backward: index out of range")
    m = tl.load(w_ptr + index * w_sc + kk * w_sk, mask=kmask, other=0.0).to(tl.float32)
    if fused != 0:
        a = tl.zeros([BLOCK_K], dtype=tl.float32)
        c0 = C * 0
        while c0 < C:
            cc = c0 + tl.arange(0, FUSED_STEP)
            cmask = cc < C
            glv = tl.load(gl_ptr + n * C + cc, mask=cmask, other=0.0)
            wv = tl.load(w_ptr + cc[:, None] * w_sc + kk[None, :] * w_sk,
                         mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            a += tl.sum(glv[:, None] * wv, 0)
            c0 += FUSED_STEP
    else:
        a = tl.load(a_ptr + n * K + kk, mask=kmask, other=0.0)
    a = a / (L * 1.0)
    g32 = g.to(tl.float32)
    tl.store(gx_ptr + n * gx_sn + kk[:, None] * gx_sk + ll[None, :] * gx_sl,
             _round(g32 * m[:, None] + a[:, None], g.dtype), mask=mask)
    tl.store(part_ptr + (n * K + kk) * S + s, tl.sum(g32 * x, 1), mask=kmask)


@triton.jit
def _cas_gather_kernel(gw_ptr, gb_ptr, gl_ptr, mean_ptr, part_ptr, index_ptr, N, K, C, S,
                       k_blocks, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """gw[c, kk] = sum over the samples n of grad_logits[n, c] * mean[n, kk], plus t[n, kk] where
    index[n] == c (t: the backward stream's S partials of channel kk, summed in chunk order),
    for a block of classes c; the samples in order, BLOCK_N at a time. A step is two products
    on tl.dot (IEEE float32): grad_logits.T @ mean, and the classes' one-hot rows @ t, which
    adds each finite t to its label's row only (the one-hot zeros meet finite values). Where a
    step's t holds an inf or NaN, those values are added separately, sample by sample, to their
    label's row, selected, not multiplied by a 0/1 mask, so that an inf in another class's
    sample cannot turn into a NaN. The programs of the first channel block also store gb[c] =
    the sum of grad_logits[:, c] (the bias gradient) in the same order."""
    pid = tl.program_id(0).to(tl.int64)
    cc = (pid // k_blocks) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    kk = (pid % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    cmask = cc < C
    kmask = kk < K
    local = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    n0 = 0
    while n0 < N:
        nn = n0 + local.to(tl.int64)
        nmask = nn < N
        rmask = nmask[:, None] & kmask[None, :]
        idx = tl.load(index_ptr + nn, mask=nmask, other=-1)
        rows = (nn[:, None] * K + kk[None, :]) * S
        t = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        s = 0
        while s < S:
            # Four chunks' loads in flight together, then added in chunk order.
            p0 = tl.load(part_ptr + rows + s, mask=rmask, other=0.0)
            p1 = tl.load(part_ptr + rows + s + 1, mask=rmask & (s + 1 < S), other=0.0)
            p2 = tl.load(part_ptr + rows + s + 2, mask=rmask & (s + 2 < S), other=0.0)
            p3 = tl.load(part_ptr + rows + s + 3, mask=rmask & (s + 3 < S), other=0.0)
            t += p0
            t += p1
            t += p2
            t += p3
            s += _GATHER_S
        mv = tl.load(mean_ptr + nn[:, None] * K + kk[None, :], mask=rmask, other=0.0)
        g = tl.load(gl_ptr + nn[None, :] * C + cc[:, None], mask=cmask[:, None] & nmask[None, :],
                    other=0.0)
        finite = tl.abs(t) < float("inf")  # False for inf and NaN
        hit = cc[:, None] == idx[None, :]
        acc = tl.dot(g, mv, acc, input_precision="ieee")
        acc = tl.dot(hit.to(tl.float32), tl.where(finite, t, 0.0), acc, input_precision="ieee")
        if tl.max(tl.where(finite, 0, 1)) > 0:
            i = 0
            while i < BLOCK_N:
                t_i = tl.sum(tl.where((local[:, None] == i) & ~finite, t, 0.0), 0)
                idx_i = tl.sum(tl.where(local == i, idx, 0), 0)
                acc = tl.where(cc[:, None] == idx_i, acc + t_i[None, :], acc)
                i += 1
        bias += tl.sum(g, 1)
        n0 += BLOCK_N
    tl.store(gw_ptr + cc[:, None] * K + kk[None, :], acc, mask=cmask[:, None] & kmask[None, :])
    tl.store(gb_ptr + cc, bias, mask=cmask & (pid % k_blocks == 0))


# Whether triton.jit made interpreted functions (TRITON_INTERPRET=1 at import: CPU tensors, no
# PTX). Launch constexprs that differ under the interpreter follow it, not the tensors' device,
# so that a launch recorded with CPU tensors for the GPU (benchmarks/gpu_report.py) has the GPU's
# configuration.
INTERPRETED = not isinstance(_cas_stream_kernel, JITFunction)
_ROUND_BY_HAND = tl.constexpr(INTERPRETED)  # (_round)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context every launcher launches in: Triton launches on the current CUDA device, not
    on its arguments', so t's device is made current (CPU tensors, under the interpreter, need
    nothing)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers. triton.cdiv and triton.next_power_of_2 are constexpr
    functions: called on the host each goes through the JIT's argument unwrapping (~2 us, a
    launcher makes several a call), where this is integer arithmetic."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The least power of two >= v (1 for v <= 1), on the host (see cdiv)."""
    return 1 << max(0, v - 1).bit_length()


def _channels_last(*tensors: torch.Tensor) -> bool:
    """Whether the streamed tensors all have their channels contiguous (then K is the inner
    dimension of the tiles)."""
    return tensors[0].shape[2] > 1 and all(t.stride(1) == 1 for t in tensors)


def _stream_config(N: int, K: int, L: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_L, num_warps) of the streaming tiles: the inner (contiguous) extent, then
    the tile halved while the grid has fewer than _FILL programs or the tile is larger than
    the outer extent needs."""
    inner_len, outer_len = (K, L) if channels_last else (L, K)
    inner = next(b for b in _INNER + (_INNER[-1],) if b >= min(inner_len, _INNER[-1]))
    tile = _TILES[-1]

    def programs(t: int) -> int:
        return N * cdiv(inner_len, inner) * cdiv(outer_len, t // inner)

    while tile > _TILES[0] and (tile // inner > next_pow2(outer_len) or programs(tile) < _FILL):
        tile //= 2
    outer = tile // inner
    block_k, block_l = (inner, outer) if channels_last else (outer, inner)
    return block_k, block_l, tile // _ELEMS_PER_WARP


def _fused_step(block_k: int, num_warps: int) -> int:
    """Classes a step of the backward stream's own grad_logits @ weight: a tile of that many
    weight rows by BLOCK_K channels no larger than the streaming tile (num_warps * 256)."""
    return max(1, min(_FUSED_MAX_STEP, num_warps * _ELEMS_PER_WARP // block_k))


def _tail_config(block_k: int, block_l: int, C: int, warps: int | None = None
                 ) -> dict[str, int]:
    """The fused stream's TAIL_C (classes of its weight tile: the fewest of _TAIL_CLASSES that
    hold C; the largest where the stream does not form the logits) and LOGIT_K (channels a
    step: a (TAIL_C, LOGIT_K) tile of half the streaming tile's elements, 4 a thread; as
    large as the streaming tile, the tail raised the kernel's registers from 64 to 76-80 on
    sm_90, 37.5% occupancy instead of 50%), or of _WIDE_TAIL elements for a grid of at most
    _ONE_WAVE warps in all (`warps`)."""
    tail_c = next((c for c in _TAIL_CLASSES if c >= C), _TAIL_CLASSES[-1])
    logit_k = block_k * block_l // (2 * tail_c)
    if warps is not None and warps <= _ONE_WAVE:
        logit_k = max(logit_k, _WIDE_TAIL // tail_c)
    return {"TAIL_C": tail_c, "LOGIT_K": logit_k}


def _logits_config(K: int, C: int, S: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_K, BLOCK_S, num_warps) of the logits kernel (more than
    _FUSED_CLASSES classes)."""
    block_s = next((c for c in _CHUNKS if c >= S), _CHUNKS[-1])
    return (_WIDE_SAMPLES, _WIDE_CLASSES, _WIDE_CHANNELS // (1 if block_s == 1 else 2), block_s,
            _LOGITS_WARPS)


def _gather_classes(C: int) -> int:
    return min(64, max(16, next_pow2(C)))


def _check(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{what} (triton): expected x (N, K, L) and weight (C, K), got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype not in _TL_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"{what} (triton): x and weight must share a dtype among float32, float16, "
                        f"bfloat16, got {x.dtype} and {weight.dtype}")


def _stream_grid(N: int, K: int, L: int, block_k: int, block_l: int) -> tuple[int, int, int]:
    """(programs, k_blocks, S) of a streaming launch."""
    k_blocks, chunks = cdiv(K, block_k), cdiv(L, block_l)
    programs = N * k_blocks * chunks
    if programs >= 2**31:
        raise ValueError(f"cas (triton): the input is too large for one launch ({programs} tiles)")
    return programs, k_blocks, chunks


def cas_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, label: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, logits, index, mean) as the pyprune::cas schema says."""
    _check(x, weight, "cas")
    N, K, L = x.shape
    C = weight.shape[0]
    out = torch.empty_like(x)
    logits = x.new_empty((N, C))
    index = x.new_empty((N,), dtype=torch.int64)
    mean = x.new_empty((N, K), dtype=torch.float32)
    if N == 0:
        return out, logits, index, mean
    if label is not None and (label.dtype != torch.int64 or label.shape != (N,)):
        raise ValueError(f"cas (triton): label must be int64 of shape ({N},)")
    # The kernels read label[n] and bias[c] at unit stride.
    bias = bias.contiguous() if bias is not None else weight
    label = label.contiguous() if label is not None else None
    train = label is not None
    block_k, block_l, num_warps = _stream_config(N, K, L, _channels_last(x, out))
    programs, k_blocks, S = _stream_grid(N, K, L, block_k, block_l)
    part = x.new_empty((N, K, S), dtype=torch.float32)
    block_n, block_c, block_kl, block_s, logit_warps = _logits_config(K, C, S)
    c_blocks = cdiv(C, block_c)
    sel = label if train else index
    has_bias = int(bias is not weight)
    # Train: the kernels flag labels out of range, and one asynchronous assert checks the flag:
    # no host sync. Fused (few classes): the tail of the batch's last sample writes the flag (1
    # where no sample marked a bad label). Unfused: program 0 of the stream sets it, the logits
    # kernel clears it on a bad label.
    fused = C <= _FUSED_CLASSES
    flag = x.new_empty((1,), dtype=torch.int32)

    def stream(mode: int) -> None:
        _cas_stream_kernel[(programs,)](
            x, weight, sel, out, part, flag, bias, logits, index, mean, count,
            N, K, L, C, S, k_blocks, mode, int(fused and mode != _WRITE), has_bias,
            *x.stride(), *out.stride(), *weight.stride(),
            BLOCK_K=block_k, BLOCK_L=block_l,
            **_tail_config(block_k, block_l, C, programs * num_warps),
            num_warps=num_warps, maxnreg=MAX_REGS,
        )

    with on_device(x):
        # Fused: per-sample counts, the samples done and the bad-label mark, zero and left
        # zero by the stream (triton_kernels/_counters: no fill launch before it; unfused, the
        # stream does not read them).
        with counters(x.device, N + 2) as count:
            stream(_TRAIN if train else _SUMS)
        if not fused:
            _cas_logits_kernel[(cdiv(N, block_n) * c_blocks,)](
                weight, bias, part, sel, logits, index, mean, flag,
                N, K, L, C, S, c_blocks, int(train), has_bias, *weight.stride(),
                BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=block_kl, BLOCK_S=block_s,
                num_warps=logit_warps, maxnreg=MAX_REGS,
            )
        if train:
            torch._assert_async(flag, f"label values must be in [0, {C})")
        else:
            if not fused:
                _cas_argmax_kernel[(N,)](logits, index, C, BLOCK=_ARGMAX_BLOCK, num_warps=4,
                                         maxnreg=MAX_REGS)
            stream(_WRITE)
    return out, logits, index, mean


def cas_backward(
    grad_out: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    index: torch.Tensor, mean: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) as the pyprune::_cas_backward schema says."""
    _check(x, weight, "cas backward")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError("cas backward (triton): grad_out must match x's shape and dtype")
    N, K, L = x.shape
    C = weight.shape[0]
    gl = grad_logits.float().contiguous()
    grad_x = torch.empty_like(x)
    if N == 0:
        return grad_x, weight.new_zeros(weight.shape), gl.sum(0).to(weight.dtype)
    index = index.contiguous()
    block_k, block_l, num_warps = _stream_config(N, K, L, _channels_last(x, grad_out, grad_x))
    step = _fused_step(block_k, num_warps)
    fused = cdiv(C, step) <= _FUSED_MAX_STEPS
    a = gl if fused else (gl @ weight.float()).contiguous()  # (unread where fused)
    programs, k_blocks, S = _stream_grid(N, K, L, block_k, block_l)
    part = x.new_empty((N, K, S), dtype=torch.float32)
    grad_weight = x.new_empty((C, K), dtype=torch.float32)
    grad_bias = x.new_empty((C,), dtype=torch.float32)
    block_c = _gather_classes(C)
    g_blocks = cdiv(K, _GATHER_K)
    with on_device(x):
        _cas_backward_kernel[(programs,)](
            grad_out, x, weight, a, gl, index, grad_x, part,
            K, L, C, S, k_blocks, int(fused),
            *grad_out.stride(), *x.stride(), *grad_x.stride(), *weight.stride(),
            BLOCK_K=block_k, BLOCK_L=block_l, FUSED_STEP=step, num_warps=num_warps,
            maxnreg=MAX_REGS,
        )
        _cas_gather_kernel[(cdiv(C, block_c) * g_blocks,)](
            grad_weight, grad_bias, gl, mean.float().contiguous(), part, index, N, K, C, S,
            g_blocks, BLOCK_N=_GATHER_N, BLOCK_C=block_c, BLOCK_K=_GATHER_K,
            num_warps=_GATHER_WARPS, maxnreg=MAX_REGS,
        )
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


_POINTERS = {
    "sel_ptr": "*i64", "label_ptr": "*i64", "index_ptr": "*i64", "part_ptr": "*fp32",
    "mean_ptr": "*fp32", "a_ptr": "*fp32", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
    "gl_ptr": "*fp32", "flag_ptr": "*i32", "count_ptr": "*i32",
}


def _aot_variants() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) the launchers above can launch: configs
    change only at powers of two of N, K, L, C and S, so sampling those covers them all."""
    sizes = [1 << i for i in range(15)]
    # The streaming configs, and those whose grid can be one wave (a tail on the wide tile).
    stream, one_wave = set(), set()
    for n, k, l, cl in itertools.product([1 << i for i in range(9)], sizes, sizes, (False, True)):
        config = _stream_config(n, k, l, cl)
        stream.add(config)
        if _stream_grid(n, k, l, *config[:2])[0] * config[2] <= _ONE_WAVE:
            one_wave.add(config)
    logits = {_logits_config(k, c, s) for k in sizes for c in sizes for s in sizes
              if c > _FUSED_CLASSES}
    variants = []

    def add(kernel, dtype, constexprs, num_warps):
        variants.append((kernel, signature(kernel, dtype, constexprs, _POINTERS), constexprs,
                         {"num_warps": num_warps, "maxnreg": MAX_REGS}))

    for dtype in _TL_DTYPES.values():
        for block_k, block_l, num_warps in sorted(stream):
            grids = (None, 1) if (block_k, block_l, num_warps) in one_wave else (None,)
            tails = {tuple(_tail_config(block_k, block_l, tail_c, warps).items())
                     for tail_c in _TAIL_CLASSES for warps in grids}
            for tail in sorted(tails):
                add(_cas_stream_kernel, dtype, {"BLOCK_K": block_k, "BLOCK_L": block_l,
                                                **dict(tail)}, num_warps)
            add(_cas_backward_kernel, dtype, {"BLOCK_K": block_k, "BLOCK_L": block_l,
                                              "FUSED_STEP": _fused_step(block_k, num_warps)},
                num_warps)
        for block_n, block_c, block_k, block_s, num_warps in sorted(logits):
            add(_cas_logits_kernel, dtype, {"BLOCK_N": block_n, "BLOCK_C": block_c,
                                            "BLOCK_K": block_k, "BLOCK_S": block_s}, num_warps)
        add(_cas_argmax_kernel, dtype, {"BLOCK": _ARGMAX_BLOCK}, 4)
    for block_c in sorted({_gather_classes(c) for c in sizes}):
        add(_cas_gather_kernel, "fp32", {"BLOCK_N": _GATHER_N, "BLOCK_C": block_c,
                                         "BLOCK_K": _GATHER_K}, _GATHER_WARPS)
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
