"""Masked conv2d Triton kernel and launchers (contract: csrc/ops.cpp, csrc/masked_conv.h).

out = conv2d(x * in_mask, weight, bias) * out_mask for groups == 1, with boolean channel masks:
in_mask (C_in,) or (N, C_in), out_mask (C_out,) or (N, C_out), None = all kept. A masked input
channel takes no part (it is never loaded, so inf or NaN in it cannot leak); a masked output
channel is exactly 0, bias included.

Forward: an implicit-GEMM launch (after the packing launch, below) over (pixel range, block of
BLOCK_P output pixels, block of BLOCK_CO output channels), accumulating in float32 the product
of an im2col tile of x (BLOCK_P, BLOCK_CI) and a weight tile (BLOCK_CI, BLOCK_CO) with tl.dot,
for every tap (kh, kw) and every chunk of BLOCK_CI input channels: one flat loop over (tap,
chunk) steps, a `for` loop on the GPU that the compiler software-pipelines (num_stages: the
loads of the next steps' tiles in flight while the tensor cores multiply this one's). On x as
it is (unpacked), the loop is bound by the instructions of its gathers (a step: 130-280 lane
instructions a thread in the sm_90 SASS), so a dense step's tap and chunk are counters
advanced each step, not divisions of the step index. Nothing a step
loads may depend on another load of the same step, or the pipeline drains at every step (the
SASS then waits for all copies in flight, DEPBAR.LE SB0, 0x0, once per dependent load): listed
input channels are loaded once per chunk, outside a loop over that chunk's taps (HOISTED), and
the soft-mask scaling, which takes the x tile through registers, is a variant of its own
(IN_SCALE). The pipeline copies shared memory asynchronously, 4 bytes or more a copy: 16-bit
elements gathered one by one cannot go that way, so for them the loop itself loads the next
step's tiles into registers before this step's product (PREFETCH). float32 inputs multiply in
TF32 where
PyTorch lets cuDNN convolutions do so (torch.backends.cudnn.allow_tf32, its default) and in IEEE
float32 otherwise (then results match cuDNN/oneDNN without TF32), chosen per call
(input_precision); float16 and bfloat16 tiles go to the tensor cores as they are.

Packed (PACKED; every launch without a per-sample bool in_mask): one launch of _pack_kernel
first lays x out as xp (N, H + 2 pad_h, W + 2 pad_w, C_pad) and the weight as wp (C_out, KH, KW,
C_pad): channels innermost, a static in_mask's kept channels first (a soft in_mask's scales
applied, a bool weight mask's masked entries 0), zeros on the padding and past the kept count to
the end of the last chunk. The forward kernel then loads each tile unmasked, a pixel's row from
its tap-(0, 0) input pixel plus the tap's offset, in asynchronous copies (4-byte elements and
16-bit ones alike; no PREFETCH): 68-88 lane instructions a thread a step in the sm_90 SASS
against 130-280 on NCHW x, with fewer warps (_PACKED_ACCUMULATORS). Its steps run a chunk's taps
back to back, then the next chunk, and x's tiles go in 8-byte copies (cp.async.ca, LDGSTS.E.64),
which fill L1, where 16-byte ones (cp.async.cg) bypass it: the 9 taps of a chunk read shifted
tiles of one patch of xp (the tile's rows and their halo, a few KB to ~20 KB), so L2 serves each
patch once a chunk and L1 the other eight taps, instead of L2 serving every tap (9x the x
traffic, which bound the small-map layers). The weight's tiles, read once a program, go in
16-byte copies. xp is the convolution's workspace, about x's size (cuDNN also converts NCHW for
its tensor-core kernels); the packing reads x's kept channels once.

Pixel ranges: with per-sample masks (or soft scales) a range is one sample's H_out * W_out
pixels (N ranges); with masks shared by the batch, or none, one range runs over all N * H_out *
W_out pixels, so a pixel tile spans samples and a 4x4 or 14x14 map fills it (each pixel row
carries its sample's offset).

Tiles (_blocks): 16-128 pixels by 16-128 output channels (at most 128 x 64 on sm_90, 64 x 32
on sm_80), 32 input channels a step, each the smallest that covers its dimension, halved while
a launch has fewer programs than the GPU has SMs, so that small batches still fill it; warps by
the tile elements a thread holds, per architecture (_ELEMENTS_PER_THREAD; the launcher reads
the device's compute capability), so that no variant spills at MAX_REGS registers on sm_80 or
sm_90 (the AOT compile fails on any spill).

Masked work is skipped by the channel order, not only by whole blocks of contiguous channels:
the launcher turns each mask into its channels listed kept-first (a stable descending sort of
the mask, per sample for an (N, C) mask; a mask shared by the batch is sorted once per mask
version, _MaskCache), and each program counts the kept channels of its
sample's mask row itself (a sum over C bytes from L2). Program j of the output channels takes the
channels at positions [j * BLOCK_CO, (j + 1) * BLOCK_CO) of that list, so the kept channels of
sample n fill the first ceil(kept / BLOCK_CO) blocks whatever their indices; a block past the
kept count holds only masked channels and stores zeros without loading anything. The reduction
walks only the first `kept` input channels of the list, in chunks of BLOCK_CI: the work is
proportional to the kept channels (in_kept * out_kept up to the block tails), which is what a
random per-sample gate (FBS) needs, since it rarely leaves a whole aligned block masked. Loads
and stores gather channels through the list; ascending order within the kept channels keeps
them close together in memory. A list costs one sort per per-sample mask in the launcher (none
for a cached static mask, or a None mask: the kernel takes the channels in order), except a
packed launch's per-sample out_mask, whose lists the packing launch writes from running counts
(_order_row); the convolution itself is one launch.

Soft (float) masks (pyprune::_masked_conv2d_scaled_triton, pyprune/ops/masked_conv.py): an
in_mask, (C_in,) or (N, C_in) in x's dtype, scales x's channels as the kernel loads them (all
channels kept), so no scaled copy of x is made; an out_mask, (C_out,) or (N, C_out), scales
the output in the epilogue, and where its gradient is needed the same launch also stores the
unscaled output (raw). Their backward is the bool-mask backward below on x * in_mask and
grad * out_mask (formed there, for the gradients only).

Weight mask (bool, weight's shape, without channel masks; pyprune::_sparse_conv2d's contract):
the same kernel runs block-sparse. The launcher lists, per tile of BLOCK_CO = 16 output
channels, the (16-input-channel block, tap) pairs whose weight tile keeps an entry, a block's
taps back to back (a sort of the tile occupancy, torch ops on the mask, no host
synchronization; once per mask version, _MaskCache); the kernel walks only those, so the work
is proportional to the occupied tiles. Packed (the default), the packing launch stores weight *
mask (exact zeros where masked, inf and NaN included) into wp, and a block's taps reread one
patch of xp from L1, as on the dense packed path (a step: 89 float32, 78 16-bit lane
instructions a thread in the sm_90 SASS at 128 x 16 and 4 warps, against 179 / 125 at 8 warps
unpacked: each list entry holds its channel block, kh and kw as bit fields, so that a step takes
them by shifts and masks, not by two integer divisions);
unpacked, each step loads the mask's tile with the weight's and zeroes the masked entries. A
sample that holds inf or NaN walks every tile instead, so inf meets the masked zeros and gives
NaN as conv2d(x, weight * mask) does: packed, each program of the packing launch flags whether
its tile of x is finite, and a program of the kernel reads its samples' flags (no launch of
their own); unpacked, a float32 sum per sample flags it (an overflow sends a finite sample
through every tile too: the same result, more work).
Backward: the weight gradient from the dense engine, masked; grad_x (stride 1) by the kernel on
the transposed, flipped weight and mask (the flipped mask's table cached per version of the
forward's mask; packed, the packing launch reads transposed views of the weight and mask with
their taps in reverse, so no flipped copy is made).

Backward: with stride 1 (groups 1, padding within the dilated kernel), grad_x is this forward
kernel run on grad with the transposed, flipped weight and the masks swapped (packed: the
packing reads the weight's taps in reverse, flip_taps), so it skips the masked output channels
as the forward does and writes the masked input channels as zeros. The
weight gradient (and grad_x otherwise) runs the dense engine (torch's convolution_backward:
cuDNN on CUDA, oneDNN on the CPU) on the masked tensors: grad masked by out_mask, x by in_mask,
and grad_x masked by in_mask again; grad_bias is the masked grad summed over (N, H, W).

Unpacked (per-sample bool in_masks, and shapes whose packed offsets would pass int32) the
kernel gathers from x as it is, through the channel lists below.

Under the interpreter (FOR_LOOP False) the reduction is a `while` loop over the
same steps (Triton 3.6's interpreter cannot take a runtime bound in range() with numpy >= 2.4);
both loops run one step (_reduce). The flags are runtime int32 values to keep the AOT list
small, except the input-channel kind (IN_LIST, IN_SCALE), which decides what the pipelined loop
loads; kernel sizes KH, KW are runtime too. Offsets inside a sample and in the weight are int32
(the launcher checks that they fit), a sample's own offset int64. UPCAST (bfloat16 on CPU
tensors, i.e. under the interpreter, only) converts the tiles to float32 before tl.dot, because
Triton 3.6's interpreter multiplies bfloat16 tiles as their uint16 bits; the products are exact
in float32 either way, so the result is the same math as the GPU's bfloat16 tensor-core dot
with float32 accumulation.
"""
from __future__ import annotations

import collections
import functools

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import StorageWeakRef

from .._layout import memory_format
from .aot import signature

from .cas import INTERPRETED, MAX_REGS, _round, cdiv, on_device

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Tiles for the tensor cores (tl.dot needs every dimension >= 16): pixels x output channels
# from these, input channels BLOCK_CI at a time (32 float32 values: a 128-byte row).
_BLOCK_PS = (16, 32, 64, 128)
_BLOCK_COS = (16, 32, 64, 128)
_BLOCK_CI = 32
# xp's and wp's channels: a multiple of this (the dense chunk; the weight-mask path's 16-channel
# blocks fit in it too).
_PACK_CI = tl.constexpr(_BLOCK_CI)
# The largest output-channel tile with a bool output mask: the kept channels of a sample fill
# ceil(kept / BLOCK_CO) blocks, so a smaller tile wastes less on the last one.
_MASKED_BLOCK_CO = 32
# The GPU's SMs (an H100 / H200 has 132). The launcher halves the tiles until a launch has at
# least 3/4 of that many programs busy: splitting further to fill the last quarter of a wave
# would make every program's MMA less efficient than it gains. Under a bool output mask it
# counts a quarter of the output-channel blocks as busy, as for a 25% keep (blocks past the
# kept channels only store zeros; the kept counts are device data the launcher does not read).
_SMS = 132
# Output- and input-channel tile of the weight-mask path: the smallest, so that most all-zero
# tiles of a pruned weight are whole tiles that can be skipped.
_WEIGHT_MASK_BLOCK = 16
# The largest share of a weight mask's (16-channel block, tap) tiles that keep a weight for
# which the block-sparse kernel runs (packed). Above it the dense kernel on the packed weight *
# mask is faster: the block-sparse kernel's 16-channel tiles cost ~1.5x the dense kernel's
# wider ones a tile (at every tile kept the roofline model predicts 35.7 against 22.8 us on
# an H200 at 32x128x16x16, pack included), and an unstructured mask keeps a weight in almost
# every tile (1 - 0.9^256 of them at 10% of the weights). The model puts the break-even near
# 0.57 of the tiles (at 32x128x16x16 and 32x256x14x14 alike); a half is a round value under
# it, where the dense kernel costs up to ~12% more than the block-sparse one would (masks
# keeping 50-57% of their tiles). The choice is device data (_block_table's
# gated counts, made with the block table once per mask version), which the launch's programs
# read (GATED): no host synchronization, no second launch.
_SPARSE_MAX_SHARE = 0.5
# The smallest block-sparse pixel tile whose launches carry the dense programs. A kernel holding
# both bodies takes the registers and shared memory of the larger, the dense one's (sm_90 SASS:
# 127 float32 registers, 36 KiB): at 128 pixels the block-sparse body alone needs about as much
# (122, 27 KiB; 4 programs an SM either way), at 16-64 pixels it needs far less (56-80, 9-6
# programs an SM), which the dense body would cut to 4. Smaller tiles are taken for small
# problems, where the block-sparse kernel runs alone as before.
_GATED_MIN_P = 128
# Tile elements per thread (the float32 accumulator and one pipeline stage of the x and weight
# tiles) that fit MAX_REGS registers without spills: the fewest warps of _WARPS that keep a
# launch within it, per architecture. sm_90's warpgroup MMA, which Triton uses from 64 pixels
# on, reads its operands from shared memory; the sm_80-style MMA of smaller tiles holds them in
# registers, hence the smaller budget. sm_80 has no warpgroup MMA: every tile holds its
# operands in registers, and its compiles spill above 16 elements a thread (64 x 32 tiles at 8
# warps, 32 x 64 at 8) or, for tiles past 2048 accumulators, at every warp count and depth.
_ELEMENTS_PER_THREAD = {90: {"wgmma": 30, "mma": 16}, 80: {"wgmma": 16, "mma": 16}}
_WARPS = (4, 8, 16)
# Accumulators per thread of a PACKED launch: its loop holds few addresses and no masks, so
# a thread's share of the tiles in flight is small, and fewer warps issue fewer instructions
# a step (each thread's loop costs about the same at any count: 64 x 32 tiles run 80 lane
# instructions a thread a step at 4 warps, 74 at 8, sm_90 SASS). 32 spill at 128 registers.
_PACKED_ACCUMULATORS = 16
# Accumulator elements of the largest tile, per architecture (sm_90: 128 x 64; sm_80: 64 x 32).
_MAX_TILES = {90: 128 * 64, 80: 64 * 32}
_MAX_TILE = _MAX_TILES[90]
# The architectures with their own launch configurations: sm_80's rules serve GPUs before
# Hopper, sm_90's Hopper and later.
ARCHS = (80, 90)
# Software-pipeline depth of the reduction loop on tensor cores (shared memory: stages x the
# two tiles); IEEE float32 runs tl.dot as FMAs on operands held in registers, which leave no
# room for tiles in flight (spills at every depth above 1).
_NUM_STAGES = {"tensor": 3, "ieee": 1}
# Whether launches without a weight mask or a per-sample bool in_mask pack x and the weight
# first (_pack_kernel, the PACKED path); tests turn it off to run the other paths.
_PACK = True
# _pack_kernel's tiles: pixels by _BLOCK_CI channels, in 4 warps (~22 lane instructions an
# element in the sm_90 SASS, against ~34 for 64 pixels).
_PACK_PIXELS = 128
_PACK_WARPS = 4

# Whether samples holding inf or NaN run every tile of a weight mask (as they must, for the
# result of conv2d(x, weight * weight_mask)); off only in the test that shows that the empty
# tiles are not computed.
_CHECK_FINITE = True
# The largest share of a step's x and weight tiles a thread may hold for the 16-bit prefetch
# (_prefetch): 64 x 16 tiles at 4 warps (20) spill with listed input channels on sm_90.
_PREFETCH_ELEMENTS = 16


@triton.jit
def _scaled(xt, scale):
    """An x tile times its channels' scales, computed in float32 and rounded to x's dtype as
    x * in_mask is (Triton's interpreter cannot multiply bfloat16 values directly)."""
    return (xt.to(tl.float32) * scale.to(tl.float32)[None, :]).to(xt.dtype)


@triton.jit
def _kept_count(mask_row, C, listed, BLOCK: tl.constexpr):
    """The kept channels of a bool mask row (C without a mask): a sum over the row, which a
    program reads from L2, instead of a launch that counts them."""
    kept = C
    if listed != 0:
        kept = 0
        c0 = 0
        while c0 < C:
            cs = c0 + tl.arange(0, BLOCK)
            kept += tl.sum(tl.load(mask_row + cs, mask=cs < C, other=0).to(tl.int32))
            c0 += BLOCK
    return kept


@triton.jit
def _channels(order, slots, ok, listed):
    """The channels at these slots of a kept-first list, or the slots themselves where no mask
    made a list."""
    listed_ch = tl.load(order + slots, mask=ok & (listed != 0), other=0).to(tl.int32)
    return tl.where(listed != 0, listed_ch, slots)


@triton.jit
def _next_tap(kh, kw, KW):
    """The next tap's (kh, kw)."""
    kw += 1
    wrap = kw >= KW
    return tl.where(wrap, kh + 1, kh), tl.where(wrap, 0, kw)


@triton.jit
def _next_step(kh, kw, c0, in_kept, KW, BLOCK_CI: tl.constexpr):
    """The dense reduction's next (kh, kw, c0): the next chunk of the kept input channels, then
    the next tap."""
    c0 += BLOCK_CI
    wrap = c0 >= in_kept
    tap_h, tap_w = _next_tap(kh, kw, KW)
    return tl.where(wrap, tap_h, kh), tl.where(wrap, tap_w, kw), tl.where(wrap, 0, c0)


@triton.jit
def _tiles(j, kh, kw, c0, live, listed, taps, x_rows, oh, ow, p_ok, H, W, KW, stride_h, stride_w,
           pad_h, pad_w, dil_h, dil_w, in_list, in_kept, scale_row, w_ptr, wm_ptr, co, co_ok, x_sc,
           x_sh, x_sw, w_so, w_si, w_sh, w_sw, BLOCK_CI: tl.constexpr, SPARSE: tl.constexpr,
           IN_LIST: tl.constexpr, IN_SCALE: tl.constexpr, HOISTED: tl.constexpr,
           PACKED: tl.constexpr):
    """The tiles of step j of the reduction (zeros where live is false): the x tile (pixels,
    BLOCK_CI input channels) at one tap and the weight tile (BLOCK_CI, output channels) there.
    Dense, step j is chunk j % chunks of the kept input channels at tap j // chunks (PACKED:
    tap j % (KH KW) of chunk j // (KH KW)), (kh, kw, c0) as the caller's counters hold it
    (HOISTED: listed holds the chunk's listed channels; IN_LIST otherwise: the step loads them);
    SPARSE, entry j of the caller's group of block-list entries in listed, its channel block,
    kh and kw bit fields of one int32 (_block_entries; taps = the widths of the kw and kh
    fields, kw's in its low byte: shifts and masks, no division in the step; unused by the
    dense paths). PACKED: x and the weight as
    _pack_kernel lays them out (x_rows each pixel's tap-(0, 0) address, co valid rows): every
    address in bounds and every channel of a chunk stored, so the tiles load unmasked: x in
    8-byte copies that fill L1, the weight in 16-byte ones."""
    if SPARSE:
        e = tl.sum(tl.where(tl.arange(0, BLOCK_CI) == j, listed, 0))
        kw_bits = taps & 255
        kh_bits = taps >> 8
        one = tl.full([], 1, tl.int32)
        kw = e & ((one << kw_bits) - 1)
        kh = (e >> kw_bits) & ((one << kh_bits) - 1)
        c0 = (e >> (kw_bits + kh_bits)) * BLOCK_CI
    if PACKED:
        cs = c0 + tl.arange(0, BLOCK_CI)
        tap = kh * dil_h * x_sh + kw * dil_w * x_sw
        # 8-byte copies (cp.async.ca, which fills L1; 16-byte ones bypass it): the chunk's
        # next taps read the same patch of xp, shifted by a pixel or a row, from L1.
        VEC: tl.constexpr = 64 // x_rows.dtype.element_ty.primitive_bitwidth
        xt = tl.load(x_rows[:, None] + tl.max_contiguous(tap + cs, VEC)[None, :])
        wt = tl.load(w_ptr + (kh * w_sh + kw * w_sw) + co[None, :] * w_so + cs[:, None])
        return xt, wt
    ih = oh * stride_h - pad_h + kh * dil_h
    iw = ow * stride_w - pad_w + kw * dil_w
    pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    cs = c0 + tl.arange(0, BLOCK_CI)
    c_ok = (cs < in_kept) & live
    if HOISTED:
        ci = listed  # the chunk's listed channels, loaded by the caller (outside the tap loop)
    elif IN_LIST:
        ci = tl.load(in_list + cs, mask=c_ok, other=0).to(tl.int32)
    else:
        ci = cs
    xt = tl.load(x_rows[:, None] + (ih * x_sh + iw * x_sw)[:, None] + ci[None, :] * x_sc,
                 mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
    if IN_SCALE:  # soft input mask: the tile passes through registers to be scaled
        xt = _scaled(xt, tl.load(scale_row + ci, mask=c_ok, other=1.0))
    w_off = kh * w_sh + kw * w_sw + co[None, :] * w_so + ci[:, None] * w_si
    w_ok = c_ok[:, None] & co_ok[None, :]
    wt = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)
    if SPARSE:
        keep = tl.load(wm_ptr + w_off, mask=w_ok, other=0)
        wt = tl.where(keep != 0, wt, tl.zeros_like(wt))
    return xt, wt


@triton.jit
def _tile_dot(acc, xt, wt, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    return tl.dot(xt, wt, acc, input_precision=PRECISION)


@triton.jit
def _advance(kh, kw, c0, in_kept, KH, KW, BLOCK_CI: tl.constexpr, TAPS: tl.constexpr,
             PACKED: tl.constexpr):
    """The next step's counters: the next tap (TAPS: a chunk's tap loop; PACKED: the taps
    fastest, then the next chunk, so that a chunk's taps run back to back and reread its
    patch of xp from L1), else the next chunk of the kept input channels, then the next tap."""
    if TAPS:
        kh, kw = _next_tap(kh, kw, KW)
    elif PACKED:
        kh, kw = _next_tap(kh, kw, KW)
        wrap = kh >= KH
        kh = tl.where(wrap, 0, kh)
        c0 = tl.where(wrap, c0 + BLOCK_CI, c0)
    else:
        kh, kw, c0 = _next_step(kh, kw, c0, in_kept, KW, BLOCK_CI)
    return kh, kw, c0


@triton.jit
def _step(acc, j, steps, kh, kw, c0, xt, wt, listed, taps, x_rows, oh, ow, p_ok, H, W, KH,
          KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept, scale_row, w_ptr,
          wm_ptr, co, co_ok, x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw, BLOCK_CI: tl.constexpr,
          SPARSE: tl.constexpr, IN_LIST: tl.constexpr, IN_SCALE: tl.constexpr,
          HOISTED: tl.constexpr, TAPS: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr,
          PRECISION: tl.constexpr, PACKED: tl.constexpr):
    """One trip of _reduce's loop, step j: (acc, kh, kw, c0, xt, wt) after it. With PREFETCH,
    xt and wt hold step j's tiles (loaded the trip before) and the trip loads step j + 1's;
    else they are placeholders and the trip loads its own."""
    if PREFETCH:
        kh, kw, c0 = _advance(kh, kw, c0, in_kept, KH, KW, BLOCK_CI, TAPS, PACKED)
        xn, wn = _tiles(j + 1, kh, kw, c0, j + 1 < steps, listed, taps, x_rows, oh, ow, p_ok, H,
                        W, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept,
                        scale_row, w_ptr, wm_ptr, co, co_ok, x_sc, x_sh, x_sw, w_so, w_si, w_sh,
                        w_sw, BLOCK_CI, SPARSE, IN_LIST, IN_SCALE, HOISTED, PACKED)
        acc = _tile_dot(acc, xt, wt, UPCAST, PRECISION)
        xt = xn
        wt = wn
    else:
        xs, ws = _tiles(j, kh, kw, c0, True, listed, taps, x_rows, oh, ow, p_ok, H, W, KW,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept,
                        scale_row, w_ptr, wm_ptr, co, co_ok, x_sc, x_sh, x_sw, w_so, w_si, w_sh,
                        w_sw, BLOCK_CI, SPARSE, IN_LIST, IN_SCALE, HOISTED, PACKED)
        acc = _tile_dot(acc, xs, ws, UPCAST, PRECISION)
        if not SPARSE:
            kh, kw, c0 = _advance(kh, kw, c0, in_kept, KH, KW, BLOCK_CI, TAPS, PACKED)
    return acc, kh, kw, c0, xt, wt


@triton.jit
def _reduce(acc, steps, c0, listed, taps, x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h,
            stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept, scale_row, w_ptr, wm_ptr, co,
            co_ok, x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw, BLOCK_CI: tl.constexpr, SPARSE: tl.constexpr,
            IN_LIST: tl.constexpr, IN_SCALE: tl.constexpr, HOISTED: tl.constexpr,
            TAPS: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr, FOR_LOOP: tl.constexpr, PACKED: tl.constexpr):
    """acc plus `steps` steps of the reduction from tap 0 and chunk c0 (TAPS: the taps of one
    chunk; PACKED: the taps fastest, then the chunks; else the kept chunks fastest, then the
    taps, or the block list's entries). Dense steps advance counters (no integer division in
    the loop). The loads of 4-byte types go to
    shared memory asynchronously and the compiler pipelines them (num_stages); 16-bit elements
    gathered one by one cannot (an asynchronous copy moves 4 bytes or more), so with PREFETCH
    the loop loads the next step's tiles into registers before this step's product, their
    latency hidden behind it."""
    kh = 0
    kw = 0
    if PREFETCH:
        xt, wt = _tiles(0, kh, kw, c0, steps > 0, listed, taps, x_rows, oh, ow, p_ok, H, W, KW,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept,
                        scale_row, w_ptr, wm_ptr, co, co_ok, x_sc, x_sh, x_sw, w_so, w_si, w_sh,
                        w_sw, BLOCK_CI, SPARSE, IN_LIST, IN_SCALE, HOISTED, PACKED)
    else:  # placeholders (_step passes them on unchanged)
        xt = tl.zeros([1], dtype=tl.float32)
        wt = tl.zeros([1], dtype=tl.float32)
    if FOR_LOOP:  # a `for` loop on the GPU, software-pipelined by the compiler
        for j in range(0, steps):
            acc, kh, kw, c0, xt, wt = _step(acc, j, steps, kh, kw, c0, xt, wt, listed, taps,
                                            x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h,
                                            stride_w, pad_h, pad_w, dil_h, dil_w, in_list,
                                            in_kept, scale_row, w_ptr, wm_ptr, co, co_ok, x_sc,
                                            x_sh, x_sw,
                                            w_so, w_si, w_sh, w_sw, BLOCK_CI, SPARSE, IN_LIST,
                                            IN_SCALE, HOISTED, TAPS, PREFETCH, UPCAST, PRECISION,
                                            PACKED)
    else:  # the interpreter: a `while` loop (see the module docstring)
        j = 0
        while j < steps:
            acc, kh, kw, c0, xt, wt = _step(acc, j, steps, kh, kw, c0, xt, wt, listed, taps,
                                            x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h,
                                            stride_w, pad_h, pad_w, dil_h, dil_w, in_list,
                                            in_kept, scale_row, w_ptr, wm_ptr, co, co_ok, x_sc,
                                            x_sh, x_sw,
                                            w_so, w_si, w_sh, w_sw, BLOCK_CI, SPARSE, IN_LIST,
                                            IN_SCALE, HOISTED, TAPS, PREFETCH, UPCAST, PRECISION,
                                            PACKED)
            j += 1
    return acc


@triton.jit
def _conv_program(
    pid,
    x_ptr, w_ptr, b_ptr, in_idx_ptr, in_mask_ptr, out_idx_ptr, out_mask_ptr, out_ptr,
    wm_ptr, blk_idx_ptr, blk_cnt_ptr, finite_ptr, in_scale_ptr, out_scale_ptr, raw_ptr,
    C_in, H, W, C_out, H_out, W_out, KH, KW, finite_per, tap_bits,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    span, p_blocks, co_blocks, in_per_sample, out_per_sample, in_listed, out_listed, has_bias,
    tap_blocks, has_out_scale, has_raw,
    x_sn, x_sc, x_sh, x_sw,
    w_so, w_si, w_sh, w_sw,
    out_sn, out_sc, out_sh, out_sw,
    BLOCK_P: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    SPARSE: tl.constexpr,
    PRECISION: tl.constexpr,
    FOR_LOOP: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_LIST: tl.constexpr,
    IN_SCALE: tl.constexpr,
    PREFETCH: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Program pid of a launch of _masked_conv2d_forward_kernel with these tiles: its block
    of output pixels by output channels, written whole."""
    # Output-channel blocks vary fastest: neighbouring programs share the same x tile.
    # Pixel tiles run over the output pixels of `span` consecutive samples (span 1: one
    # sample, the program's n; span N: the whole batch, n = 0, for masks shared by the batch),
    # so a small feature map still fills the tile. Offsets inside a sample (and in the weight)
    # are int32, which the launcher checks (span * H_out * W_out too); sample offsets int64.
    co_b = pid % co_blocks
    rest = pid // co_blocks
    p_b = rest % p_blocks
    n = rest // p_blocks

    out_row = n * out_per_sample
    out_kept = _kept_count(out_mask_ptr + out_row * C_out, C_out, out_listed, 256)
    slots = co_b * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co = _channels(out_idx_ptr + out_row * C_out, slots, slots < C_out, out_listed)
    co_ok = slots < out_kept

    P = H_out * W_out
    ps = p_b * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P * span
    ps = tl.minimum(ps, P * span - 1)  # the tail's rows address the last pixel (not stored)
    pn = ps // P  # sample of each pixel, relative to n
    q = ps - pn * P
    oh = q // W_out
    ow = q % W_out
    rows = n + pn

    # Listed input channels are loaded once a chunk, outside a pipelined tap loop, except on the
    # weight-mask path and for float32 in IEEE, whose tl.dot runs as FMAs on operands in
    # registers without a pipeline (num_stages 1): there the list would take registers that
    # the largest tiles need (they would spill), and a step loads its channels itself.
    HOISTED: tl.constexpr = IN_LIST and not SPARSE and not (
        PRECISION == "ieee" and x_ptr.dtype.element_ty == tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    if co_b * BLOCK_CO < out_kept:
        in_row = n * in_per_sample
        if PACKED:  # a bool in_mask shared by the batch, or none (in_listed says which)
            in_kept = _kept_count(in_mask_ptr, C_in, in_listed, 256)
        else:
            in_kept = _kept_count(in_mask_ptr + in_row * C_in, C_in, IN_LIST, 256)
        in_list = in_idx_ptr + in_row * C_in
        chunks = tl.cdiv(in_kept, BLOCK_CI)
        scale_row = in_scale_ptr + n * C_in
        if PACKED:
            # x and the weight packed (_pack_kernel): xp (N, H + 2 pad_h, W + 2 pad_w, C_pad),
            # wp (C_out, KH, KW, C_pad), the listed channels first, then zeros to a whole
            # chunk (a weight mask's masked entries zero). The strides follow from C_pad, a
            # multiple of _PACK_CI, which is what lets the compiler prove each chunk's 16-byte
            # alignment. A pixel's row starts at its tap-(0, 0) input pixel.
            c_pad = tl.cdiv(C_in, _PACK_CI) * _PACK_CI
            p_sw = c_pad
            p_sh = (W + 2 * pad_w) * p_sw
            x_rows = x_ptr + (rows.to(tl.int64) * ((H + 2 * pad_h) * p_sh)
                              + (oh * stride_h * p_sh + ow * stride_w * p_sw))
            co_w = tl.where(slots < C_out, co, 0)  # every row of wp a tile loads exists
            xs_c, xs_h, xs_w = 1, p_sh, p_sw
            ws_o, ws_i, ws_h, ws_w = KH * KW * c_pad, 1, KW * c_pad, c_pad
        else:
            x_rows = x_ptr + rows.to(tl.int64) * x_sn
            co_w = co
            xs_c, xs_h, xs_w = x_sc, x_sh, x_sw
            ws_o, ws_i, ws_h, ws_w = w_so, w_si, w_sh, w_sw
        if SPARSE:
            # Only the listed (tap, input-channel block) pairs of this block of output
            # channels, all of them where a sample of the tile may hold inf or NaN; the list a
            # group of BLOCK_CI entries at a time, loaded before a loop over them that the
            # compiler pipelines (loaded in the step, an entry would make the tiles' addresses
            # wait on a load of the same step: the pipeline would drain at each of its loads).
            # Packed, the tiles are wp's, whose masked entries are zeros; else the step loads
            # the mask's tile with the weight's.
            # The tile's samples are rows r0..r1 (consecutive): their finite_per flags each.
            r0 = n + (p_b * BLOCK_P) // P
            r1 = n + (tl.minimum(p_b * BLOCK_P + BLOCK_P, P * span) - 1) // P
            f = r0 * finite_per
            f_end = (r1 + 1) * finite_per
            flagged = 0
            while f < f_end:
                fs = f + tl.arange(0, 256)
                flagged += tl.sum((tl.load(finite_ptr + fs, mask=fs < f_end, other=1) == 0
                                   ).to(tl.int32))
                f += 256
            every = flagged > 0
            # Row co_blocks of the lists holds every entry, for such tiles.
            blk_list = blk_idx_ptr + tl.where(every, co_blocks, co_b) * tap_blocks
            steps = tl.where(every, tap_blocks, tl.load(blk_cnt_ptr + co_b))
            j0 = 0
            while j0 < steps:
                entries = j0 + tl.arange(0, BLOCK_CI)
                listed = tl.load(blk_list + entries, mask=entries < steps, other=0)
                acc = _reduce(acc, tl.minimum(steps - j0, BLOCK_CI), tl.full([], 0, tl.int32),
                              listed, tap_bits, x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h,
                              stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept, scale_row,
                              w_ptr, wm_ptr, co_w, co_ok, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h,
                              ws_w, BLOCK_CI, SPARSE, IN_LIST, IN_SCALE, HOISTED, False,
                              PREFETCH, UPCAST, PRECISION, FOR_LOOP, PACKED)
                j0 += BLOCK_CI
        elif PACKED:  # a bool in_mask shared by the batch, or none
            acc = _reduce(acc, KH * KW * chunks, tl.full([], 0, tl.int32), tl.arange(0, BLOCK_CI),
                          chunks, x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h, stride_w,
                          pad_h, pad_w, dil_h, dil_w, in_list, in_kept, scale_row, w_ptr, wm_ptr,
                          co_w, co_ok, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w, BLOCK_CI, False,
                          False, False, False, False, False, UPCAST, PRECISION, FOR_LOOP, True)
        elif HOISTED:
            # Listed input channels: each chunk's channels loaded once, then its KH * KW taps
            # in an inner loop that the compiler pipelines (for the same reason).
            c0 = 0
            while c0 < in_kept:
                cs = c0 + tl.arange(0, BLOCK_CI)
                listed = tl.load(in_list + cs, mask=cs < in_kept, other=0).to(tl.int32)
                acc = _reduce(acc, KH * KW, c0, listed, chunks, x_rows, oh, ow, p_ok, H, W, KH,
                              KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in_list, in_kept,
                              scale_row, w_ptr, wm_ptr, co, co_ok, x_sc, x_sh, x_sw, w_so, w_si,
                              w_sh, w_sw, BLOCK_CI, SPARSE, IN_LIST, IN_SCALE, HOISTED, True,
                              PREFETCH, UPCAST, PRECISION, FOR_LOOP, False)
                c0 += BLOCK_CI
        else:
            acc = _reduce(acc, KH * KW * chunks, tl.full([], 0, tl.int32), tl.arange(0, BLOCK_CI),
                          chunks, x_rows, oh, ow, p_ok, H, W, KH, KW, stride_h, stride_w, pad_h,
                          pad_w, dil_h, dil_w, in_list, in_kept, scale_row, w_ptr, wm_ptr, co, co_ok,
                          x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw, BLOCK_CI, SPARSE, IN_LIST,
                          IN_SCALE, HOISTED, False, PREFETCH, UPCAST, PRECISION, FOR_LOOP,
                          False)
        bias = tl.load(b_ptr + co, mask=co_ok & (has_bias != 0), other=0.0).to(tl.float32)
        acc = tl.where(co_ok[None, :], acc + bias[None, :], 0.0)

    sample = (rows.to(tl.int64) * out_sn)[:, None]
    offsets = co[None, :] * out_sc + oh[:, None] * out_sh + ow[:, None] * out_sw
    in_out = p_ok[:, None] & (slots < C_out)[None, :]
    result = _round(acc, out_ptr.dtype.element_ty)
    if has_raw != 0:  # the unscaled output, for the soft output mask's gradient
        tl.store(raw_ptr + sample + offsets, result, mask=in_out)
    if has_out_scale != 0:  # soft output mask: the rounded output times the sample's scales
        scale = tl.load(out_scale_ptr + n * C_out + co, mask=co_ok, other=0.0).to(tl.float32)
        result = _round(result.to(tl.float32) * scale[None, :], out_ptr.dtype.element_ty)
    tl.store(out_ptr + sample + offsets, result, mask=in_out)


@triton.jit(do_not_specialize=["span", "in_per_sample", "out_per_sample", "in_listed",
                               "out_listed", "has_bias", "has_out_scale", "has_raw",
                               "finite_per", "tap_bits", "groups_n"])
def _masked_conv2d_forward_kernel(
    x_ptr, w_ptr, b_ptr, in_idx_ptr, in_mask_ptr, out_idx_ptr, out_mask_ptr, out_ptr,
    wm_ptr, blk_idx_ptr, blk_cnt_ptr, finite_ptr, in_scale_ptr, out_scale_ptr, raw_ptr,
    C_in, H, W, C_out, H_out, W_out, KH, KW, finite_per, tap_bits,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    span, p_blocks, co_blocks, in_per_sample, out_per_sample, in_listed, out_listed, has_bias,
    tap_blocks, has_out_scale, has_raw,
    x_sn, x_sc, x_sh, x_sw,
    w_so, w_si, w_sh, w_sw,
    out_sn, out_sc, out_sh, out_sw,
    groups_n,
    BLOCK_P: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    SPARSE: tl.constexpr,
    PRECISION: tl.constexpr,
    FOR_LOOP: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_LIST: tl.constexpr,
    IN_SCALE: tl.constexpr,
    PREFETCH: tl.constexpr,
    PACKED: tl.constexpr,
    GATED: tl.constexpr,
    DENSE_P: tl.constexpr,
    DENSE_CO: tl.constexpr,
):
    """The masked convolution (masked_conv2d_forward): a grid of (groups_n pixel ranges) x
    (p_blocks) x (co_blocks) programs of BLOCK_P output pixels by BLOCK_CO output channels.

    GATED (a packed weight mask, SPARSE): the launch carries the dense kernel too, on wp
    (weight * mask) in tiles of DENSE_P pixels by DENSE_CO output channels (BLOCK_CI = 32),
    at the same warps. The mask's gated counts (blk_cnt_ptr, _block_table) choose: -1 (more
    than _SPARSE_MAX_SHARE of its tiles keep a weight) runs the dense programs, else the
    block-sparse ones; the grid covers the larger of the two, and the programs past the chosen
    one's grid return at once."""
    pid = tl.program_id(0)
    if GATED:
        if tl.load(blk_cnt_ptr) < 0:  # the dense programs, on the whole of wp
            d_p_blocks = tl.cdiv(H_out * W_out * span, DENSE_P)
            d_co_blocks = tl.cdiv(C_out, DENSE_CO)
            if pid < groups_n * d_p_blocks * d_co_blocks:
                _conv_program(
                    pid, x_ptr, w_ptr, b_ptr, in_idx_ptr, in_mask_ptr, out_idx_ptr,
                    out_mask_ptr, out_ptr, wm_ptr, blk_idx_ptr, blk_cnt_ptr, finite_ptr,
                    in_scale_ptr, out_scale_ptr, raw_ptr, C_in, H, W, C_out, H_out, W_out, KH,
                    KW, finite_per, tap_bits, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    span, d_p_blocks, d_co_blocks, in_per_sample, out_per_sample, in_listed,
                    out_listed, has_bias, tap_blocks, has_out_scale, has_raw, x_sn, x_sc, x_sh,
                    x_sw, w_so, w_si, w_sh, w_sw, out_sn, out_sc, out_sh, out_sw,
                    DENSE_P, DENSE_CO, _PACK_CI, False, PRECISION, FOR_LOOP, UPCAST, False,
                    False, False, True)
            return
        if pid >= groups_n * p_blocks * co_blocks:
            return
    _conv_program(
        pid, x_ptr, w_ptr, b_ptr, in_idx_ptr, in_mask_ptr, out_idx_ptr, out_mask_ptr,
        out_ptr, wm_ptr, blk_idx_ptr, blk_cnt_ptr, finite_ptr, in_scale_ptr, out_scale_ptr,
        raw_ptr, C_in, H, W, C_out, H_out, W_out, KH, KW, finite_per, tap_bits, stride_h,
        stride_w, pad_h, pad_w, dil_h, dil_w, span, p_blocks, co_blocks, in_per_sample,
        out_per_sample, in_listed, out_listed, has_bias, tap_blocks, has_out_scale, has_raw,
        x_sn, x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw, out_sn, out_sc, out_sh, out_sw,
        BLOCK_P, BLOCK_CO, BLOCK_CI, SPARSE, PRECISION, FOR_LOOP, UPCAST, IN_LIST, IN_SCALE,
        PREFETCH, PACKED)


@triton.jit
def _pack_tile(src, dst, order, kept, listed, scale, has_scale, keep_src, has_keep, check, H, W,
               pad_h, pad_w, inv_wp, s_c, s_h, s_w, C_pad, pix0, c0, BLOCK_PIX: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """One tile of _pack_kernel: the padded pixels [pix0, pix0 + BLOCK_PIX) of an (H + 2 pad_h,
    W + 2 pad_w) image in row-major order by BLOCK_C channels from c0, stored at pixel *
    C_pad + channel: channel c the list's c-th kept channel (scaled), 0 past the kept count and on
    the padding, and where has_keep, 0 where keep_src (bytes at src's offsets: a bool weight
    mask) is 0, exactly, inf and NaN included. A pixel's row is a float quotient (exact: (k +
    1/2) / Wp for k < 2^20 is never within rounding of an integer), one division a tile instead
    of one a pixel. Returns 1 where the tile's values read are all finite (v - v == 0 is false
    for inf and NaN only) or check is 0, else 0."""
    Wp = W + 2 * pad_w
    cs = c0 + tl.arange(0, BLOCK_C)
    c_ok = cs < kept
    ch = _channels(order, cs, c_ok, listed)
    row0 = pix0 // Wp
    k = (pix0 - row0 * Wp) + tl.arange(0, BLOCK_PIX)
    rows = ((k.to(tl.float32) + 0.5) * inv_wp).to(tl.int32)
    h = row0 + rows - pad_h
    w = k - rows * Wp - pad_w
    pix = pix0 + tl.arange(0, BLOCK_PIX)
    on = pix < (H + 2 * pad_h) * Wp
    inside = on & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    offsets = (h * s_h + w * s_w)[:, None] + ch[None, :] * s_c
    v = tl.load(src + offsets, mask=inside[:, None] & c_ok[None, :], other=0.0)
    finite = tl.full([], 1, tl.int32)
    if check != 0:
        vf = v.to(tl.float32)
        finite = tl.min(tl.min((vf - vf == 0).to(tl.int32), 1), 0)
    if has_keep != 0:  # a bool weight mask: its masked entries zero
        keep = tl.load(keep_src + offsets, mask=inside[:, None] & c_ok[None, :], other=0)
        v = tl.where(keep != 0, v, tl.zeros_like(v))
    if has_scale != 0:  # a soft in_mask: x * in_mask, rounded to x's dtype
        v = _scaled(v, tl.load(scale + ch, mask=c_ok, other=1.0))
    tl.store(dst + (pix * C_pad)[:, None] + cs[None, :], v, mask=on[:, None])
    return finite


@triton.jit
def _order_row(mask_row, order_row, C, BLOCK: tl.constexpr):
    """order_row = the kept-first list of one bool mask row: its kept channels ascending, then
    its masked ones ascending (torch.sort(mask, descending=True, stable=True).indices), from
    running counts: kept channel c goes to (kept before c), masked channel c to (all kept) +
    (masked before c)."""
    total = _kept_count(mask_row, C, 1, 256)
    kept = 0
    c0 = 0
    while c0 < C:
        cs = c0 + tl.arange(0, BLOCK)
        ok = cs < C
        m = tl.load(mask_row + cs, mask=ok, other=0).to(tl.int32)
        before = tl.cumsum(m, 0) - m  # kept channels of the block before c
        pos = tl.where(m != 0, kept + before, total + (cs - kept - before))
        tl.store(order_row + pos, cs.to(tl.int64), mask=ok)
        kept += tl.sum(m, 0)
        c0 += BLOCK


@triton.jit(do_not_specialize=["listed", "has_scale", "has_wmask", "check_finite"])
def _pack_kernel(
    x_ptr, xp_ptr, w_ptr, wp_ptr, order_ptr, mask_ptr, scale_ptr, out_order_ptr, out_mask_ptr,
    wm_ptr, finite_ptr, C_in, listed, has_scale, has_wmask, check_finite, H, W, pad_h, pad_w,
    C_out, taps, chunks, inv_wp, inv_taps,
    x_sn, x_sc, x_sh, x_sw, w_so, w_si, w_st, x_programs, x_pix_blocks, packs,
    BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x and the weight laid out for the forward kernel's PACKED path, in one launch.

    xp (N, H + 2 pad_h, W + 2 pad_w, C_pad): x's input channels as listed (kept-first order of
    a bool in_mask shared by the batch, else all in order; times a soft in_mask's scales),
    zero-padded by (pad_h, pad_w) pixels; wp (C_out, taps, C_pad): the weight's input channels
    in the same order (the weight read as a (C_out, taps) image, taps = KH * KW at stride w_st;
    with has_wmask, the entries a bool weight mask wm (bytes, the weight's strides) masks are
    0, and x program pid stores finite[pid], 1 where its tile of x holds no inf or NaN (always
    1 where check_finite is 0), for the block-sparse kernel: sample n's flags are the
    x_pix_blocks * chunks from finite[n * x_pix_blocks * chunks]). Channel c past the kept
    count is 0 in both up to the chunk of BLOCK_C that holds the last kept channel (later
    chunks, never read, are not written), so that a chunk's tail multiplies zeros by zeros; a
    masked input channel is never read. Programs [0, x_programs)
    take x tiles (sample, pixel block, channel chunk), [x_programs, packs) weight tiles (pixel
    block of the (C_out, taps) image, channel chunk), and each program past them one row of a
    per-sample bool out_mask, whose kept-first list it writes to out_order (_order_row: the
    forward kernel reads it after this launch, so no sort launch precedes it)."""
    pid = tl.program_id(0)
    if pid >= packs:
        row = (pid - packs).to(tl.int64) * C_out
        _order_row(out_mask_ptr + row, out_order_ptr + row, C_out, 256)
        return
    C_pad = chunks * BLOCK_C
    kept = _kept_count(mask_ptr, C_in, listed, 256)
    c0 = (pid % chunks) * BLOCK_C
    rest = pid // chunks
    finite = tl.full([], 1, tl.int32)
    if c0 < kept:
        if pid < x_programs:
            pb = rest % x_pix_blocks
            n = (rest // x_pix_blocks).to(tl.int64)
            finite = _pack_tile(x_ptr + n * x_sn,
                                xp_ptr + n * ((H + 2 * pad_h) * (W + 2 * pad_w) * C_pad),
                                order_ptr, kept, listed, scale_ptr + n * C_in, has_scale, wm_ptr,
                                0, check_finite, H, W, pad_h, pad_w, inv_wp, x_sc, x_sh, x_sw,
                                C_pad, pb * BLOCK_PIX, c0, BLOCK_PIX, BLOCK_C)
        else:
            pb = rest - x_programs // chunks
            _pack_tile(w_ptr, wp_ptr, order_ptr, kept, listed, scale_ptr, 0, wm_ptr, has_wmask,
                       0, C_out, taps, 0, 0, inv_taps, w_si, w_so, w_st, C_pad, pb * BLOCK_PIX,
                       c0, BLOCK_PIX, BLOCK_C)
    if (has_wmask != 0) & (pid < x_programs):
        tl.store(finite_ptr + pid, finite)


def _blocks(C_out: int, P: int, N: int, out_masked: bool = False, sparse: bool = False,
            arch: int = 90) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CO, BLOCK_CI): _tile_sizes for the GPU's _SMS, cached."""
    return _tile_sizes(C_out, P, N, out_masked, sparse, arch, _SMS)


@functools.lru_cache(maxsize=1024)
def _tile_sizes(C_out: int, P: int, N: int, out_masked: bool, sparse: bool, arch: int,
                sms: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CO, BLOCK_CI) for N pixel ranges of P output pixels (N samples, or one
    range over a whole batch whose masks are shared) and C_out output channels: each tile the
    smallest choice that covers its size, else the largest (output channels at most
    _MASKED_BLOCK_CO under a bool output mask, _WEIGHT_MASK_BLOCK by _WEIGHT_MASK_BLOCK
    channels under a weight mask), then halved while the tile is larger than the
    architecture's _MAX_TILES or the launch keeps fewer than 3/4 of _SMS programs busy: pixels
    down to 64 (the M of sm_90's warpgroup MMA), then output channels down to 16, then pixels
    down to 32 only while fewer than a quarter of _SMS programs are busy (32-pixel tiles run
    the narrower MMA)."""
    def pick(choices: tuple[int, ...], size: int) -> int:
        return next((b for b in choices if b >= size), choices[-1])

    cap = _WEIGHT_MASK_BLOCK if sparse else _MASKED_BLOCK_CO if out_masked else _BLOCK_COS[-1]
    block_p, block_co = pick(_BLOCK_PS, P), min(pick(_BLOCK_COS, C_out), cap)

    def busy() -> int:
        co_blocks = cdiv(C_out, block_co)
        busy_co = cdiv(co_blocks, 4) if out_masked else co_blocks
        return N * cdiv(P, block_p) * busy_co

    while block_p * block_co > _MAX_TILES[arch] or 4 * busy() < 3 * sms:
        if block_p > 64:
            block_p //= 2
        elif block_co > 16:
            block_co //= 2
        elif block_p > 32 and (4 * busy() < sms or block_p * block_co > _MAX_TILES[arch]):
            block_p //= 2
        else:
            break
    return block_p, block_co, _WEIGHT_MASK_BLOCK if sparse else _BLOCK_CI


def _num_warps(block_p: int, block_co: int, block_ci: int, arch: int = 90,
               packed: bool = False) -> int:
    """Warps of a launch with these tiles on sm_<arch> (_ELEMENTS_PER_THREAD; packed, on the
    tensor cores: _PACKED_ACCUMULATORS; IEEE float32, whose FMAs hold the operands in
    registers, keeps the unpacked budget)."""
    if packed:
        return next((w for w in _WARPS if block_p * block_co <= 32 * w * _PACKED_ACCUMULATORS),
                    _WARPS[-1])
    elements = block_p * block_co + block_ci * (block_p + block_co)
    budget = _ELEMENTS_PER_THREAD[arch]["wgmma" if block_p >= 64 else "mma"]
    return next((w for w in _WARPS if elements <= 32 * w * budget), _WARPS[-1])


def _prefetch(dtype: torch.dtype, block_p: int, block_co: int, block_ci: int, sparse: bool,
              warps: int) -> bool:
    """Whether the reduction loads the next step's tiles into registers ahead of this step's
    product (_reduce's PREFETCH): for 16-bit elements, which the compiler's pipeline cannot
    copy asynchronously, on the dense paths, where a thread's share of the x and weight tiles is
    at most _PREFETCH_ELEMENTS (two steps' tiles and their addresses are then live at once)."""
    share = (block_p * block_ci + block_ci * block_co) / (32 * warps)
    return dtype in (torch.float16, torch.bfloat16) and not sparse and share <= _PREFETCH_ELEMENTS


def _fma(precision: str, dtype: torch.dtype) -> bool:
    """Whether tl.dot runs as FMAs on operands held in registers (IEEE float32), not on the
    tensor cores."""
    return dtype == torch.float32 and precision == "ieee"


def _num_stages(precision: str, dtype: torch.dtype) -> int:
    return _NUM_STAGES["ieee" if _fma(precision, dtype) else "tensor"]


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    return 90 if torch.cuda.get_device_capability(index)[0] >= 9 else 80


def device_arch(device: torch.device) -> int:
    """The architecture whose launch configurations a launch on device takes (ARCHS): 80
    before Hopper, 90 from it; 90 for CPU tensors (the interpreter, and launches recorded on the
    CPU for the GPU report)."""
    if device.type != "cuda":
        return 90
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for tensors of dtype: float32 runs TF32 where PyTorch lets
    cuDNN convolutions do so (torch.backends.cudnn.allow_tf32, True by default), else IEEE
    float32; float16 and bfloat16 multiply natively (the setting does not apply to them)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _pair(v, name: str) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"masked_conv2d (triton): {name} must have two values, got {v}")
    return t


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           dtypes=tuple(_TL_DTYPES), groups: int = 1) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"masked_conv2d (triton): expected x (N, C_in, H, W) and weight "
                         f"(C_out, C_in, kH, kW), got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"masked_conv2d (triton): weight expects {weight.shape[1] * groups} "
                         f"input channels with groups={groups}, x has {x.shape[1]}")
    if x.dtype not in dtypes or weight.dtype != x.dtype:
        raise TypeError(f"masked_conv2d (triton): x and weight must share a dtype among "
                        f"{', '.join(str(d) for d in dtypes)}, got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"masked_conv2d (triton): bias must be ({weight.shape[0]},) in {x.dtype}, "
                         f"got {tuple(bias.shape)} in {bias.dtype}")


def _mask_rows(mask: torch.Tensor | None, N: int, C: int, name: str) -> torch.Tensor | None:
    """mask as a bool (1, C) or (N, C) tensor (None stays None)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_conv2d (triton): {name} must be bool, got {mask.dtype}")
    if mask.shape not in ((C,), (N, C)):
        raise ValueError(f"masked_conv2d (triton): {name} must have shape ({C},) or ({N}, {C}), "
                         f"got {tuple(mask.shape)}")
    return mask.reshape(-1, C)


def _scale_rows(mask: torch.Tensor, x: torch.Tensor, C: int | None = None,
                name: str = "in_mask") -> torch.Tensor:
    """A soft (float) channel mask in x's dtype, (C,) or (N, C) (C = x's channels unless
    given), as a contiguous (N, C) tensor of per-sample channel scales."""
    N, C = x.shape[0], x.shape[1] if C is None else C
    if mask.dtype != x.dtype:
        raise TypeError(f"masked_conv2d (triton): a soft {name} must have x's dtype {x.dtype}, "
                        f"got {mask.dtype}")
    if mask.shape not in ((C,), (N, C)):
        raise ValueError(f"masked_conv2d (triton): {name} must have shape ({C},) or ({N}, {C}), "
                         f"got {tuple(mask.shape)}")
    return mask.expand(N, C).contiguous()


class _MaskCache:
    """What the launcher derives from a mask shared by the batch (a static channel mask's
    kept-first list, a weight mask's block table), computed once per mask version (as
    csrc/masked_conv.h's KeptIndexCache keeps the CUDA backend's kept indices): a layer's mask
    changes rarely, so a result is looked up by what it is (a tag) and by the mask's storage,
    offset, shape, strides, device and version counter, and its launches run only for a mask
    version not seen before. An entry holds a weak reference to the mask's storage, not the
    storage: a mask that is freed leaves only its (small) result in the cache, and a hit whose
    storage has expired (another mask allocated at the freed address) is computed anew. A mask
    changed in place through .data (which bypasses the version counter) is not seen, as in
    PyTorch's own caches. Inference tensors have no version counter: theirs is computed on
    every call."""

    CAPACITY = 256

    def __init__(self) -> None:
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, mask: torch.Tensor, tag: tuple, compute):
        if mask.is_inference():
            return compute(mask)
        storage = mask.untyped_storage()
        key = (tag, storage.data_ptr(), mask.storage_offset(), tuple(mask.shape), mask.stride(),
               mask.device, mask._version)
        hit = self.entries.get(key)
        if hit is not None and not hit[0].expired():
            self.entries.move_to_end(key)
            return hit[1]
        result = compute(mask)
        self.entries[key] = (StorageWeakRef(storage), result)
        self.entries.move_to_end(key)
        if len(self.entries) > self.CAPACITY:
            self.entries.popitem(last=False)
        return result

    def order(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept-first list of a (1, C) bool mask (_sort_kept_first)."""
        return self.get(rows, ("order",), lambda m: _sort_kept_first(m))


def _sort_kept_first(mask: torch.Tensor) -> torch.Tensor:
    return torch.sort(mask, dim=1, descending=True, stable=True).indices


_MASKS = _MaskCache()


def _kept_first(mask: torch.Tensor | None, dummy: torch.Tensor, sort: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(channel lists kept-first, the mask rows as bytes, per-sample flag, listed flag) of a
    (R, C) bool mask: one stable sort (the kernel counts the kept channels itself), cached per
    mask version for a mask shared by the batch (R = 1, _MaskCache); for None, the dummy (the
    kernel takes the channels in order, all of them). sort=False: a per-sample mask's lists
    are left to _pack_kernel (an empty (R, C) tensor here)."""
    if mask is None:
        return dummy, _dummies(dummy.device)[1], 0, 0
    if mask.shape[0] == 1:
        order = _MASKS.order(mask)
    elif sort:
        order = _sort_kept_first(mask)
    else:
        order = torch.empty(mask.shape, dtype=torch.int64, device=mask.device)
    return order, mask.contiguous().view(torch.uint8), int(mask.shape[0] > 1), 1


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of outputs and input gradients: x's as F.conv2d and the fakes read it
    (channels_last where x's strides are channels_last-like, even if also contiguous)."""
    return memory_format(x)


def _span(t: torch.Tensor, first: int) -> int:
    """The largest element offset in t over its dimensions from `first` on."""
    return _span_of(tuple(t.shape[first:]), t.stride()[first:])


@functools.lru_cache(maxsize=1024)
def _span_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    return sum((size - 1) * abs(step) for size, step in zip(shape, stride))


# A launch's pointer arguments that the kernel never reads or writes (for absent masks and
# lists), one int64 element a device, with the views the launches take of it.
_DUMMIES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _dummies(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int64, uint8, int32) views of the device's dummy element."""
    hit = _DUMMIES.get(device)
    if hit is None:
        dummy = torch.empty(1, dtype=torch.int64, device=device)
        hit = _DUMMIES[device] = (dummy, dummy.view(torch.uint8), dummy.view(torch.int32))
    return hit


def _output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _tap_widths(KH: int, KW: int) -> tuple[int, int]:
    """The bit widths of an encoded block entry's kw and kh fields."""
    return (KW - 1).bit_length(), (KH - 1).bit_length()


def _tap_bits(KH: int, KW: int) -> int:
    """_tap_widths as the kernel takes them: kw's in the low byte, kh's in the next."""
    kw_bits, kh_bits = _tap_widths(KH, KW)
    return kw_bits | (kh_bits << 8)


def _block_entries(e: torch.Tensor, KH: int, KW: int) -> torch.Tensor:
    """Block entries e = ci_block * KH * KW + kh * KW + kw encoded as the kernel reads them:
    (ci_block << (kh bits + kw bits)) | (kh << kw bits) | kw, int32 (_tap_bits' widths, so
    that the step takes its fields by shifts and masks instead of two divisions). Ascending
    entries stay ascending."""
    kw_bits, kh_bits = _tap_widths(KH, KW)
    block, tap = e // (KH * KW), e % (KH * KW)
    fields = (block << (kh_bits + kw_bits)) | ((tap // KW) << kw_bits) | (tap % KW)
    return fields.to(torch.int32)


def _block_table(weight_mask: torch.Tensor, block_co: int, block_ci: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(block lists, block counts, input-channel blocks, gated counts) of a bool (C_out, C_in,
    KH, KW) weight mask for tiles of block_co output by block_ci input channels: row j <
    ceil(C_out / block_co) of the lists holds the blocks e = ci_block * KH * KW + tap (tap = kh
    * KW + kw) of output-channel block j that keep a weight, ascending (a channel block's taps
    back to back: packed, they reread one patch of xp from L1), then the empty ones; counts[j]
    is how many keep one; the last row holds every block in order (for tiles whose samples may
    hold inf or NaN). Entries encoded by _block_entries. The gated counts are the counts, or
    -1 each where more than _SPARSE_MAX_SHARE of all the tiles keep a weight: what a GATED
    launch's programs read to run the dense kernel or the block-sparse one. Torch ops on the
    mask only (no host synchronization)."""
    C_out, C_in, KH, KW = weight_mask.shape
    co_blocks, ci_blocks = cdiv(C_out, block_co), cdiv(C_in, block_ci)
    padded = weight_mask.new_zeros((co_blocks * block_co, ci_blocks * block_ci, KH * KW))
    padded[:C_out, :C_in] = weight_mask.reshape(C_out, C_in, KH * KW)
    occupied = padded.view(co_blocks, block_co, ci_blocks, block_ci, KH * KW).any(3).any(1)
    occupied = occupied.reshape(co_blocks, ci_blocks * KH * KW)
    order = torch.sort(occupied.logical_not(), dim=1, stable=True).indices
    every = torch.arange(ci_blocks * KH * KW, device=order.device)[None]
    lists = _block_entries(torch.cat([order, every]), KH, KW)
    counts = occupied.sum(1, dtype=torch.int32)
    dense = counts.sum() > _SPARSE_MAX_SHARE * occupied.numel()
    return lists.contiguous(), counts, ci_blocks, counts.masked_fill(dense, -1)


def _finite_samples(x: torch.Tensor) -> torch.Tensor:
    """int32 (N, 1): 1 where sample n of x is surely finite, for the block-sparse kernel on x
    unpacked (packed, the packing launch flags its tiles of x instead: no launch of its own). A
    float32 sum per sample reads x once without an x-sized temporary; a sum that overflows only
    marks a finite sample as possibly not, which sends it through every block (the same
    result, more work)."""
    return torch.isfinite(x.sum((1, 2, 3), dtype=torch.float32)).to(torch.int32)[:, None]


def masked_conv2d_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    in_mask: torch.Tensor | None, out_mask: torch.Tensor | None,
    weight_mask: torch.Tensor | None = None, raw: torch.Tensor | None = None,
    block_table: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None = None,
    flip_taps: bool = False,
) -> torch.Tensor:
    """conv2d(x * in_mask, weight * weight_mask, bias, stride, padding, dilation) * out_mask
    (groups=1) with boolean masks, as the pyprune::masked_conv2d schema (channel masks) and
    pyprune::_sparse_conv2d (weight mask, without channel masks) say; x's memory format.

    Soft (float, x's dtype) channel masks of shape (C,) or (N, C) scale inside the kernel: an
    in_mask the input channels as they are loaded, an out_mask the output (the rounded
    convolution times the scale, as conv2d(...) * out_mask rounds). raw, an empty tensor of
    the output's shape and strides, receives the unscaled output as well (for a soft out_mask's
    gradient).

    A weight mask runs block-sparse: tiles of 16 output by 16 input channels at one tap that
    keep no weight are skipped (see _block_table); packed, the kept tiles are wp's, which holds
    weight * mask, else they load the mask with the weight and zero the masked entries. Samples
    whose values may include inf or NaN run every tile, as conv2d(x, weight * weight_mask)
    multiplies them by the masked zeros too. Packed on the tensor cores in tiles of
    _GATED_MIN_P pixels, the launch carries the dense kernel on wp too (GATED), which runs
    instead where more than _SPARSE_MAX_SHARE of the tiles keep a weight (an unstructured
    mask): the programs read the mask's gated counts. block_table: the mask's _block_table for
    16 x 16 tiles where the caller has it (else looked up per mask version).

    flip_taps: the convolution takes weight.flip(2, 3) (and weight_mask.flip(2, 3)), the
    transposed convolution of the backward: packed, the packing launch reads the taps in
    reverse (no flipped copy); unpacked, the flipped copies are made here."""
    _check(x, weight, bias)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads bias[c] at unit stride
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"masked_conv2d (triton): stride and dilation must be >= 1 and padding "
                         f">= 0, got {stride}, {dilation}, {padding}")
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    H_out = _output_size(H, KH, stride[0], padding[0], dilation[0])
    W_out = _output_size(W, KW, stride[1], padding[1], dilation[1])
    if H_out < 1 or W_out < 1:
        raise ValueError(f"masked_conv2d (triton): output size ({H_out}, {W_out}) is too small for "
                         f"input ({H}, {W}), kernel ({KH}, {KW})")
    in_scale = out_scale = None
    if in_mask is not None and in_mask.dtype != torch.bool:  # soft: scales x inside the kernel
        in_scale, in_mask = _scale_rows(in_mask, x), None
    if out_mask is not None and out_mask.dtype != torch.bool:  # soft: scales the output
        out_scale, out_mask = _scale_rows(out_mask, x, C_out, "out_mask"), None
    in_rows = _mask_rows(in_mask, N, C_in, "in_mask")
    out_rows = _mask_rows(out_mask, N, C_out, "out_mask")
    for m, name in ((in_rows, "in_mask"), (out_rows, "out_mask"), (in_scale, "in_mask"),
                    (out_scale, "out_mask")):
        if m is not None and m.device != x.device:
            raise ValueError(f"masked_conv2d (triton): {name} must be on {x.device}, got {m.device}")
    out = torch.empty((N, C_out, H_out, W_out), dtype=x.dtype, device=x.device,
                      memory_format=_output_format(x))
    if raw is not None and (raw.shape != out.shape or raw.stride() != out.stride()
                            or raw.dtype != out.dtype or raw.device != out.device):
        raise ValueError(f"masked_conv2d (triton): raw must have the output's shape "
                         f"{tuple(out.shape)}, strides, dtype and device")
    if out.numel() == 0:
        return out
    if max(_span(x, 1), _span(out, 1), _span(weight, 0)) >= 2**31:
        raise ValueError("masked_conv2d (triton): a sample of x or of the output, or the weight, "
                         "spans 2**31 elements or more (the kernel's offsets are int32)")
    dummy, dummy_u8, dummy_i32 = _dummies(x.device)  # never read
    in_idx, in_bytes, in_per_sample, in_listed = _kept_first(in_rows, dummy)
    c_pad = cdiv(C_in, _BLOCK_CI) * _BLOCK_CI
    packed = (_PACK and not in_per_sample
              and (H + 2 * padding[0]) * (W + 2 * padding[1]) * c_pad < 2**31
              and KH * KW * C_out * c_pad < 2**31 and max(W + 2 * padding[1], KH * KW) < 2**20)
    if flip_taps and not packed:  # only the packing reads the taps in reverse
        weight = weight.flip(2, 3)
        weight_mask = None if weight_mask is None else weight_mask.flip(2, 3)
        flip_taps = False
    # A packed launch's per-sample output lists come from the packing launch (no sort).
    ordered = packed and out_rows is not None and out_rows.shape[0] > 1
    out_idx, out_bytes, out_per_sample, out_listed = _kept_first(out_rows, dummy, not ordered)
    # Masks shared by the batch: pixel tiles over the batch's pixels (span N), so that small
    # feature maps fill the tiles; per-sample masks and scales: one sample a tile (a soft
    # in_mask packed with x is no longer the kernel's concern).
    pixels = H_out * W_out
    flat = (not in_per_sample and not out_per_sample and (in_scale is None or packed)
            and out_scale is None and N * pixels < 2**31 - _BLOCK_PS[-1])
    span = N if flat else 1
    arch = device_arch(x.device)
    block_p, block_co, block_ci = _blocks(C_out, pixels * span, N // span, out_rows is not None,
                                          weight_mask is not None, arch)
    if weight_mask is not None:
        if in_rows is not None or out_rows is not None:
            raise ValueError("masked_conv2d (triton): a weight mask runs without channel masks")
        if weight_mask.dtype != torch.bool or weight_mask.shape != weight.shape:
            raise ValueError(f"masked_conv2d (triton): weight_mask must be bool of weight's shape "
                             f"{tuple(weight.shape)}, got {weight_mask.dtype} "
                             f"{tuple(weight_mask.shape)}")
        if weight_mask.device != x.device:
            raise ValueError(f"masked_conv2d (triton): weight_mask must be on {x.device}, got "
                             f"{weight_mask.device}")
        if cdiv(C_in, block_ci) << sum(_tap_widths(KH, KW)) >= 2**31:
            raise ValueError(f"masked_conv2d (triton): a weight mask's tiles of {C_in} input "
                             f"channels by {KH}x{KW} taps do not fit the int32 block list")
        # The mask is read at the weight's offsets (by the kernel, or packed into wp), the
        # taps as one dimension: a transposed view of each (the backward's) is read as it is.
        if weight.stride() != weight_mask.stride() or weight.stride(2) != KW * weight.stride(3):
            weight, weight_mask = weight.contiguous(), weight_mask.contiguous()
        wm = weight_mask.view(torch.uint8)
        blk_idx, blk_cnt, ci_blocks, gated_cnt = block_table or _MASKS.get(
            weight_mask, ("blocks", block_co, block_ci),
            lambda m: _block_table(m, block_co, block_ci))
        if packed:  # _packed fills it with its tiles' flags (before the kernel reads them)
            finite = _packed_flags(x, padding, c_pad)
        elif _CHECK_FINITE:
            finite = _finite_samples(x)
        else:
            finite = torch.ones((N, 1), dtype=torch.int32, device=x.device)
    else:
        # Unused by the kernel: pointers of the types it is compiled for.
        wm, blk_idx, blk_cnt, finite, ci_blocks = dummy_u8, dummy_i32, dummy_i32, dummy_i32, 1
    precision = input_precision(x.dtype)
    # Packed on the tensor cores, a weight mask's launch carries the dense kernel too (GATED):
    # the mask's gated counts pick one of the two in the kernel.
    dense_tile = (_gated_dense_tile(block_p) if weight_mask is not None and packed
                  and not _fma(precision, x.dtype) else None)
    gated = dense_tile is not None
    if gated:
        blk_cnt = gated_cnt
    x_strides, w_strides = x.stride(), weight.stride()
    if packed:  # the kernel computes the packed tensors' strides itself
        x, weight = _packed(x, weight, padding, c_pad, in_idx, in_bytes, in_listed, in_scale,
                            out_idx if ordered else None, out_bytes if ordered else None,
                            wm if weight_mask is not None else None,
                            finite if weight_mask is not None else None, flip_taps)

    p_blocks = cdiv(pixels * span, block_p)
    co_blocks = cdiv(C_out, block_co)
    programs = N // span * p_blocks * co_blocks
    warps = _num_warps(block_p, block_co, block_ci, arch, packed and not _fma(precision, x.dtype))
    dense_p, dense_co = dense_tile or (0, 0)
    if gated:
        programs = max(programs, N // span * cdiv(pixels * span, dense_p) * cdiv(C_out, dense_co))
    with on_device(x):
        _masked_conv2d_forward_kernel[(programs,)](
            x, weight, bias if bias is not None else weight, in_idx, in_bytes, out_idx, out_bytes, out,
            wm, blk_idx, blk_cnt, finite, in_scale if in_scale is not None else x,
            out_scale if out_scale is not None else x, raw if raw is not None else out,
            C_in, H, W, C_out, H_out, W_out, KH, KW, finite.shape[-1], _tap_bits(KH, KW),
            *stride, *padding, *dilation,
            span, p_blocks, co_blocks, in_per_sample, out_per_sample, in_listed, out_listed,
            int(bias is not None), KH * KW * ci_blocks, int(out_scale is not None),
            int(raw is not None),
            *x_strides, *w_strides, *out.stride(), N // span,
            BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci,
            SPARSE=weight_mask is not None, PRECISION=precision,
            FOR_LOOP=not INTERPRETED, UPCAST=x.dtype == torch.bfloat16 and INTERPRETED,
            IN_LIST=bool(in_listed) and not packed, IN_SCALE=in_scale is not None and not packed,
            PREFETCH=not packed and _prefetch(x.dtype, block_p, block_co, block_ci,
                                              weight_mask is not None, warps),
            PACKED=packed, GATED=gated, DENSE_P=dense_p, DENSE_CO=dense_co,
            num_warps=warps,
            num_stages=_num_stages(precision, x.dtype), maxnreg=MAX_REGS,
        )
    return out


def _gated_dense_tile(block_p: int) -> tuple[int, int] | None:
    """(DENSE_P, DENSE_CO): the dense tiles that a weight mask's launch with block-sparse tiles
    of block_p pixels carries (GATED), at the same 4 warps (_PACKED_ACCUMULATORS a thread):
    64 pixels by 32 output channels, input chunks of 32 channels; None (no dense programs) for
    block-sparse tiles of fewer than _GATED_MIN_P pixels."""
    return (64, 32) if block_p >= _GATED_MIN_P else None


def _pack_pixel_blocks(x: torch.Tensor, padding: tuple[int, int]) -> int:
    """_pack_kernel's pixel blocks of one padded image of x."""
    return cdiv((x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1]), _PACK_PIXELS)


def _packed_flags(x: torch.Tensor, padding: tuple[int, int], c_pad: int) -> torch.Tensor:
    """int32 (N, flags a sample), uninitialized: the finiteness flags _pack_kernel stores, one
    per tile of x it packs (with a weight mask)."""
    return torch.empty((x.shape[0], _pack_pixel_blocks(x, padding) * (c_pad // _BLOCK_CI)),
                       dtype=torch.int32, device=x.device)


def _packed(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int], c_pad: int,
            order: torch.Tensor, mask_bytes: torch.Tensor, listed: int,
            scale: torch.Tensor | None, out_order: torch.Tensor | None = None,
            out_bytes: torch.Tensor | None = None, weight_bytes: torch.Tensor | None = None,
            finite: torch.Tensor | None = None, flip_taps: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(xp, wp): x and the weight as the forward kernel's PACKED path reads them (_pack_kernel:
    xp (N, H + 2 pad_h, W + 2 pad_w, c_pad), wp (C_out, KH, KW, c_pad), the kept input channels
    first, in one launch). The convolution's workspace: with it every tile the kernel loads is
    whole and contiguous along channels (16-byte copies, no bounds tests), which NCHW x (a
    4-byte gather a value, each with its padding test) does not allow. With out_order (N,
    C_out) and out_bytes, a per-sample bool out_mask's rows as bytes, the same launch writes
    their kept-first lists into out_order. With weight_bytes, a bool weight mask's bytes at the
    weight's offsets, wp holds weight * mask (exact zeros where masked), and finite
    (_packed_flags) receives the flags of x's tiles. With flip_taps, wp holds the weight's taps
    (and the mask's) in reverse order: weight.flip(2, 3) packed, read from the weight itself
    (its last tap first, at a negative tap stride)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    if weight.stride(2) != KW * weight.stride(3):  # the taps as one dimension
        if weight_bytes is not None:
            raise ValueError("_packed: a weight mask's weight must hold its taps as one dimension")
        weight = weight.contiguous()
    if (weight_bytes is None) != (finite is None):
        raise ValueError("_packed: a weight mask's bytes and the finiteness flags go together")
    wm = mask_bytes if weight_bytes is None else weight_bytes
    w_src, w_st = weight, weight.stride(3)
    if flip_taps:  # the last tap first: the pack reads tap t at (KH KW - 1 - t) * w_st
        def last_tap(t: torch.Tensor) -> torch.Tensor:
            return t.as_strided((1,), (1,), t.storage_offset() + (KH * KW - 1) * w_st)
        w_src = last_tap(weight)
        wm = wm if weight_bytes is None else last_tap(wm)
        w_st = -w_st
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    xp = torch.empty((N, Hp, Wp, c_pad), dtype=x.dtype, device=x.device)
    wp = torch.empty((C_out, KH, KW, c_pad), dtype=x.dtype, device=x.device)
    chunks = c_pad // _BLOCK_CI
    x_pix = _pack_pixel_blocks(x, padding)
    x_programs = N * x_pix * chunks
    packs = x_programs + cdiv(C_out * KH * KW, _PACK_PIXELS) * chunks
    rows = 0 if out_order is None else out_order.shape[0]
    with on_device(x):
        _pack_kernel[(packs + rows,)](
            x, xp, w_src, wp, order, mask_bytes, scale if scale is not None else x,
            out_order if rows else order, out_bytes if rows else mask_bytes, wm,
            finite if finite is not None else order.view(torch.int32),
            C_in, listed, int(scale is not None), int(weight_bytes is not None),
            int(_CHECK_FINITE), H, W, *padding,
            C_out, KH * KW, chunks,
            1.0 / Wp, 1.0 / (KH * KW), *x.stride(), *weight.stride()[:2], w_st,
            x_programs, x_pix, packs,
            BLOCK_PIX=_PACK_PIXELS, BLOCK_C=_BLOCK_CI, num_warps=_PACK_WARPS,
        )
    return xp, wp


def _where(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t
    shape = (1, -1, 1, 1) if mask.dim() == 1 else (*mask.shape, 1, 1)
    return torch.where(mask.reshape(shape), t, 0.0)  # a scalar zero: no fill launch


def _check_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    if grad.shape[:2] != (x.shape[0], weight.shape[0]) or grad.dtype != x.dtype:
        raise ValueError(f"masked_conv2d backward (triton): grad must be ({x.shape[0]}, "
                         f"{weight.shape[0]}, H_out, W_out) in {x.dtype}, got {tuple(grad.shape)} "
                         f"in {grad.dtype}")


def _transposable(stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                  k: tuple[int, int]) -> bool:
    """Whether grad_x is a stride-1 convolution of grad (csrc/masked_conv.h, transposable)."""
    return stride == (1, 1) and all(padding[i] <= dilation[i] * (k[i] - 1) for i in range(2))


def _transposed_grad_x(grad: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int],
                       dilation: tuple[int, int], in_mask: torch.Tensor | None = None,
                       out_mask: torch.Tensor | None = None,
                       weight_mask: torch.Tensor | None = None) -> torch.Tensor:
    """grad_x = conv(grad, flipped weight^T, padding d * (k - 1) - p) by the forward kernel, the
    masks swapped: it skips what the forward skipped (masked output channels, empty weight
    tiles) and writes the masked input channels as zeros."""
    k = weight.shape[2:]
    table = None
    if weight_mask is not None:  # the flipped mask's table, per version of the forward's mask
        block = _WEIGHT_MASK_BLOCK
        table = _MASKS.get(weight_mask, ("flipped blocks", block, block),
                           lambda m: _block_table(m.transpose(0, 1).flip(2, 3), block, block))
    # Transposed views; the taps are flipped by the packing (flip_taps), not copied.
    return masked_conv2d_forward(
        grad, weight.transpose(0, 1), None, (1, 1),
        tuple(dilation[i] * (k[i] - 1) - padding[i] for i in range(2)), dilation, out_mask,
        in_mask, weight_mask=None if weight_mask is None else weight_mask.transpose(0, 1),
        block_table=table, flip_taps=True)


def masked_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    in_mask: torch.Tensor | None, out_mask: torch.Tensor | None, groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of masked_conv2d_forward with bool channel masks, as
    the pyprune::_masked_conv2d_backward_triton schema says; grad_bias is (C_out,) always,
    grad_x in x's memory format. (Soft masks: the autograd of the soft-mask op scales grad
    and x around this, pyprune/ops/masked_conv.py.)

    Runs the dense engine (aten.convolution_backward) on the masked grad and input, so it does
    the full dense work; masked channels get exactly zero gradient. Any groups. With stride 1
    (groups 1), grad_x comes from the forward kernel instead (below)."""
    _check(x, weight, None, dtypes=(*_TL_DTYPES, torch.float64), groups=groups)
    _check_grad(grad, x, weight)
    N, C_in = x.shape[:2]
    C_out = weight.shape[0]
    _mask_rows(in_mask, N, C_in, "in_mask")
    _mask_rows(out_mask, N, C_out, "out_mask")
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    transposed = (groups == 1 and x.dtype in _TL_DTYPES
                  and _transposable(stride, padding, dilation, weight.shape[2:]))
    g = _where(grad, out_mask)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, _where(x, in_mask), weight, None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [not transposed, True, False],
    )
    if transposed:
        grad_x = _transposed_grad_x(grad, weight, padding, dilation, in_mask, out_mask)
    else:
        grad_x = _where(grad_x, in_mask)
    grad_x = grad_x.contiguous(memory_format=_output_format(x))
    return grad_x, grad_w.contiguous(), g.sum((0, 2, 3)).to(weight.dtype)


def sparse_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_mask: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    x_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) of conv2d(x, weight * weight_mask) for a bool weight mask, as the
    pyprune::_sparse_conv2d_backward schema says (an empty tensor for a gradient not asked
    for); grad_x in x's memory format, grad_weight contiguous and zero at masked weights.

    With stride 1 (padding within the dilated kernel), grad_x is the block-sparse forward on
    grad with the transposed, flipped weight and mask, so it skips the same empty tiles; else,
    and for the weight gradient, the dense engine (aten.convolution_backward) runs."""
    _check(x, weight, None)
    _check_grad(grad, x, weight)
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    transposed = _transposable(stride, padding, dilation, weight.shape[2:])
    dense_x = x_grad and not transposed
    grad_x = grad_w = None
    if dense_x or weight_grad:
        masked = torch.where(weight_mask, weight, 0.0) if dense_x else weight
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, masked, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            [dense_x, weight_grad, False])
    if x_grad and transposed:
        grad_x = _transposed_grad_x(grad, weight, padding, dilation, weight_mask=weight_mask)
    grad_x = (grad_x.contiguous(memory_format=_output_format(x)) if x_grad
              else x.new_empty((0,)))
    grad_w = (torch.where(weight_mask, grad_w, 0.0).contiguous() if weight_grad
              else weight.new_empty((0,)))
    return grad_x, grad_w


_POINTERS = {"in_idx_ptr": "*i64", "in_mask_ptr": "*u8", "out_idx_ptr": "*i64",
             "out_mask_ptr": "*u8", "wm_ptr": "*u8", "blk_idx_ptr": "*i32", "blk_cnt_ptr": "*i32",
             "finite_ptr": "*i32"}


_PACK_POINTERS = {"order_ptr": "*i64", "mask_ptr": "*u8", "out_order_ptr": "*i64",
                  "out_mask_ptr": "*u8", "wm_ptr": "*u8", "finite_ptr": "*i32", "inv_wp": "fp32",
                  "inv_taps": "fp32"}


def _configs(arch: int = 90) -> list[tuple[int, int, int, bool]]:
    """Every (BLOCK_P, BLOCK_CO, BLOCK_CI, SPARSE) _blocks can choose on sm_<arch>."""
    dense = [(p, co, _BLOCK_CI, False) for p in _BLOCK_PS for co in _BLOCK_COS
             if p * co <= _MAX_TILES[arch]]
    return dense + [(p, _WEIGHT_MASK_BLOCK, _WEIGHT_MASK_BLOCK, True) for p in _BLOCK_PS]


# The input-channel kinds a launch compiles for (IN_LIST, IN_SCALE): all channels in order,
# a kept-first list of a bool in_mask, the scales of a soft in_mask (all channels kept). The
# weight-mask path runs without channel masks.
_INPUT_KINDS = ((False, False), (True, False), (False, True))


def _aot_variants() -> list[tuple]:
    """Every (kernel, signature, constexprs, options, archs) masked_conv2d_forward can launch
    on a GPU: one per dtype, input precision (float32: tf32 and ieee), block configuration of
    each architecture and input-channel kind (_INPUT_KINDS), compiled for the architectures
    whose launches take those options; the weight mask's packed ones on the tensor cores with
    tiles of _GATED_MIN_P pixels GATED (carrying the dense kernel's tiles, _gated_dense_tile)."""
    by_options: dict[tuple, list[int]] = {}
    for arch in ARCHS:
        for dtype, name in _TL_DTYPES.items():
            for precision in ("tf32", "ieee") if dtype == torch.float32 else ("ieee",):
                for block_p, block_co, block_ci, sparse in _configs(arch):
                    warps = _num_warps(block_p, block_co, block_ci, arch)
                    prefetch = _prefetch(dtype, block_p, block_co, block_ci, sparse, warps)
                    kinds = [(False, False, False)] if sparse else [
                        (in_list, in_scale, False) for in_list, in_scale in _INPUT_KINDS]
                    kinds.append((False, False, True))  # packed
                    for in_list, in_scale, packed in kinds:
                        key = (name, precision, block_p, block_co, block_ci, sparse, in_list,
                               in_scale, prefetch and not packed, packed,
                               _num_warps(block_p, block_co, block_ci, arch,
                                          packed and not _fma(precision, dtype)),
                               _num_stages(precision, dtype))
                        gated = bool(sparse and packed and not _fma(precision, dtype)
                                     and _gated_dense_tile(block_p))
                        by_options.setdefault(key + (gated,), []).append(arch)
    variants = []
    for (name, precision, block_p, block_co, block_ci, sparse, in_list, in_scale, prefetch,
         packed, warps, stages, gated), archs in by_options.items():
        dense_p, dense_co = (gated and _gated_dense_tile(block_p)) or (0, 0)
        constexprs = {"BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_CI": block_ci,
                      "SPARSE": sparse, "PRECISION": precision, "FOR_LOOP": True,
                      "UPCAST": False, "IN_LIST": in_list, "IN_SCALE": in_scale,
                      "PREFETCH": prefetch, "PACKED": packed, "GATED": gated,
                      "DENSE_P": dense_p, "DENSE_CO": dense_co}
        options = {"num_warps": warps, "num_stages": stages, "maxnreg": MAX_REGS}
        variants.append((_masked_conv2d_forward_kernel,
                         signature(_masked_conv2d_forward_kernel, name, constexprs, _POINTERS),
                         constexprs, options, tuple(archs),
                         ("x_ptr", "w_ptr") if packed else ()))  # _packed's allocations
    pack = {"BLOCK_PIX": _PACK_PIXELS, "BLOCK_C": _BLOCK_CI}
    for name in _TL_DTYPES.values():
        variants.append((_pack_kernel, signature(_pack_kernel, name, pack, _PACK_POINTERS), pack,
                         {"num_warps": _PACK_WARPS}, ARCHS, ("xp_ptr", "wp_ptr")))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
