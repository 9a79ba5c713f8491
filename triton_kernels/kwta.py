"""k-WTA Triton kernels and launchers (contract: csrc/kwta.h, csrc/cpu/kwta.cpp).

x is an (N, C, L) view with any strides; each (n, c) row of L elements is a group.

Forward, one launch, one program per group: a radix select finds the group's k-th largest key
in four passes of 8-bit digits (a 256-bin histogram of the candidates' next digit, the digit
picked by a cumulative count from the top bin), then the same program writes out and stores the
threshold. A group that fits in one block is loaded once and kept in registers for all passes;
a larger one is streamed in BLOCK chunks on every pass. (The chunk loops are `while` loops:
Triton 3.6's interpreter cannot take a runtime bound in range() with numpy >= 2.4.)

Keys are uint32 whose order is the float order of the values (of |x| if absolute; half types
go through float32, which keeps their order), with NaN mapped to the largest key, as torch.topk
ranks NaN. The mask compares values, not keys, so -0 and +0 tie as they do for torch's >=.

Backward: one elementwise launch over (group, element) tiles reading each group's threshold.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import signature
from .cas import on_device

RADIX_BITS = tl.constexpr(8)
BINS = tl.constexpr(1 << 8)
# Forward block sizes: the next power of two of L within these bounds. A group of up to
# _FWD_MAX_BLOCK elements lives in registers; larger ones are streamed.
_FWD_MIN_BLOCK = 32
_FWD_MAX_BLOCK = 4096
# The largest group: the streamed loop's int32 offset (start + lanes) must not overflow.
MAX_GROUP = 2**31 - 1 - _FWD_MAX_BLOCK
# Backward tiles hold _BWD_TILE elements: _BWD_TILE // BLOCK_L groups of BLOCK_L elements.
_BWD_MIN_BLOCK_L = 16
_BWD_TILE = 1024
_BWD_NUM_WARPS = 4

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _to_key(v, absolute):
    """uint32 keys ordered like v (or |v| if absolute), NaN largest."""
    bits = v.to(tl.uint32, bitcast=True) & tl.where(absolute != 0, 0x7FFFFFFF, 0xFFFFFFFF)
    # Negative values: flip every bit (reverses their order); others: set the sign bit.
    # XOR with a constant rather than ~, which the interpreter cannot apply to uint32.
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return tl.where(v != v, 0xFFFFFFFF, key)


@triton.jit
def _from_key(key):
    bits = key ^ tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _keep(v, threshold, absolute):
    key = tl.where(absolute != 0, tl.abs(v), v)
    return (key >= threshold) | (v != v)


@triton.jit
def _pick_digit(hist, rank):
    """The digit whose bucket holds the rank-th largest candidate (rank 1-based from the top),
    and the rank within that bucket."""
    bins = tl.arange(0, BINS)
    from_top = tl.cumsum(hist, 0, reverse=True)
    digit = tl.max(tl.where(from_top >= rank, bins, 0), 0)
    above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    return digit, rank - above


# `absolute` is an int32 flag, not a constexpr: it costs one AND and one select per element, and
# halves the variants to compile. Not specialized, so 1 does not become a second variant either
# (and a bool cannot be passed: the interpreter mis-converts it).
@triton.jit(do_not_specialize=["absolute"])
def _kwta_forward_kernel(
    x_ptr, out_ptr, threshold_ptr,
    C, L, k, absolute,
    x_sn, x_sc, x_sl,
    out_sn, out_sc, out_sl,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    x_base = x_ptr + n * x_sn + c * x_sc
    out_base = out_ptr + n * out_sn + c * out_sc
    lanes = tl.arange(0, BLOCK).to(tl.int64)

    rank = k
    prefix = tl.zeros([], dtype=tl.uint32)
    prefix_mask = tl.zeros([], dtype=tl.uint32)
    if ONE_BLOCK:
        in_group = lanes < L
        v = tl.load(x_base + lanes * x_sl, mask=in_group, other=0.0).to(tl.float32)
        keys = _to_key(v, absolute)
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        if ONE_BLOCK:
            candidate = in_group & ((keys & prefix_mask) == prefix)
            digits = ((keys >> shift) & (BINS - 1)).to(tl.int32)
            hist = tl.histogram(digits, BINS, mask=candidate)
        else:
            hist = tl.zeros([BINS], dtype=tl.int32)
            start = 0
            while start < L:
                offs = start + lanes
                in_group = offs < L
                v = tl.load(x_base + offs * x_sl, mask=in_group, other=0.0).to(tl.float32)
                keys = _to_key(v, absolute)
                candidate = in_group & ((keys & prefix_mask) == prefix)
                digits = ((keys >> shift) & (BINS - 1)).to(tl.int32)
                hist += tl.histogram(digits, BINS, mask=candidate)
                start += BLOCK
        digit, rank = _pick_digit(hist, rank)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        prefix_mask = prefix_mask | tl.full([], (BINS - 1) << shift, tl.uint32)

    threshold = _from_key(prefix)
    tl.store(threshold_ptr + group, threshold.to(threshold_ptr.dtype.element_ty))
    if ONE_BLOCK:
        kept = tl.where(_keep(v, threshold, absolute), v, 0.0)
        tl.store(out_base + lanes * out_sl, kept.to(out_ptr.dtype.element_ty), mask=in_group)
    else:
        start = 0
        while start < L:
            offs = start + lanes
            in_group = offs < L
            raw = tl.load(x_base + offs * x_sl, mask=in_group, other=0.0)
            keep = _keep(raw.to(tl.float32), threshold, absolute)
            tl.store(out_base + offs * out_sl, tl.where(keep, raw, 0.0).to(raw.dtype), mask=in_group)
            start += BLOCK


@triton.jit(do_not_specialize=["absolute"])
def _kwta_backward_kernel(
    grad_ptr, x_ptr, threshold_ptr, out_ptr,
    G, C, L, blocks_per_row,
    g_sn, g_sc, g_sl,
    x_sn, x_sc, x_sl,
    t_sn, t_sc,
    out_sn, out_sc, out_sl,
    absolute,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # One flat grid axis: CUDA caps grid axes 1 and 2 at 65535, and N * C can exceed that.
    pid = tl.program_id(0).to(tl.int64)
    groups = (pid // blocks_per_row) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    elems = (pid % blocks_per_row) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    n = groups // C
    c = groups % C
    row_ok = groups < G
    mask = row_ok[:, None] & (elems < L)[None, :]
    threshold = tl.load(threshold_ptr + n * t_sn + c * t_sc, mask=row_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + (n * x_sn + c * x_sc)[:, None] + elems[None, :] * x_sl, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + (n * g_sn + c * g_sc)[:, None] + elems[None, :] * g_sl, mask=mask, other=0.0)
    keep = _keep(x.to(tl.float32), threshold[:, None], absolute)
    tl.store(out_ptr + (n * out_sn + c * out_sc)[:, None] + elems[None, :] * out_sl,
             tl.where(keep, grad, 0.0).to(grad.dtype), mask=mask)


def _forward_config(length: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for groups of ``length`` elements: a warp per 128 elements
    (4 keys per thread: a group held in registers needs no more to stay under 128 registers
    without spills), at most 16 warps, or 8 for a streamed group's chunks."""
    block = min(max(triton.next_power_of_2(length), _FWD_MIN_BLOCK), _FWD_MAX_BLOCK)
    one_block = length <= block
    return block, one_block, min(max(block // 128, 1), 16 if one_block else 8)


def _backward_config(length: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_L) for groups of ``length`` elements."""
    block_l = min(max(triton.next_power_of_2(length), _BWD_MIN_BLOCK_L), _BWD_TILE)
    return _BWD_TILE // block_l, block_l


def _check_dtype(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"kwta (triton): {name} must be float32, float16 or bfloat16, got {x.dtype}")


def kwta_forward(x: torch.Tensor, k: int, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, threshold): out = x where key(x) >= the group's k-th largest key or x is NaN, else 0;
    threshold (N, C) holds that k-th largest key as a value."""
    if x.dim() != 3:
        raise ValueError(f"kwta (triton): x must be a 3-D (N, C, L) group view, got shape {tuple(x.shape)}")
    _check_dtype(x, "x")
    N, C, L = x.shape
    if not 1 <= k <= L:
        raise ValueError(f"kwta (triton): k must be in [1, {L}], got {k}")
    if L > MAX_GROUP:  # the kernel's loop counter and histogram counts are int32
        raise ValueError(f"kwta (triton): groups of at most {MAX_GROUP} elements, got {L}")
    out = torch.empty_like(x)
    threshold = x.new_empty((N, C))
    if x.numel() == 0:
        return out, threshold
    block, one_block, num_warps = _forward_config(L)
    with on_device(x):
        _kwta_forward_kernel[(N * C,)](
            x, out, threshold,
            C, L, k, int(absolute),
            *x.stride(), *out.stride(),
            BLOCK=block, ONE_BLOCK=one_block,
            num_warps=num_warps,
        )
    return out, threshold


def kwta_backward(
    grad: torch.Tensor, x: torch.Tensor, threshold: torch.Tensor, absolute: bool
) -> torch.Tensor:
    """grad where keep(x) (key(x) >= threshold of its group, or x NaN), else 0."""
    if x.dim() != 3 or grad.shape != x.shape or threshold.shape != x.shape[:2]:
        raise ValueError(
            "kwta backward (triton): expected grad and x of one (N, C, L) shape and threshold "
            f"(N, C); got grad {tuple(grad.shape)}, x {tuple(x.shape)}, threshold {tuple(threshold.shape)}"
        )
    _check_dtype(x, "x")
    if grad.dtype != x.dtype or threshold.dtype != x.dtype:
        raise TypeError(f"kwta backward (triton): grad and threshold must have x's dtype {x.dtype}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    N, C, L = x.shape
    block_g, block_l = _backward_config(L)
    blocks_per_row = triton.cdiv(L, block_l)
    grid = (triton.cdiv(N * C, block_g) * blocks_per_row,)
    with on_device(x):
        _kwta_backward_kernel[grid](
            grad, x, threshold, out,
            N * C, C, L, blocks_per_row,
            *grad.stride(), *x.stride(), *threshold.stride(), *out.stride(), int(absolute),
            BLOCK_G=block_g, BLOCK_L=block_l,
            num_warps=_BWD_NUM_WARPS,
        )
    return out


def _aot_variants() -> list[tuple]:
    """Every (kernel, signature, constexprs, options) the launchers above can launch.

    Configs change only at powers of two of L, so sampling L = 2**i covers them all."""
    forward = {_forward_config(1 << i) for i in range(_FWD_MAX_BLOCK.bit_length() + 1)}
    backward = {_backward_config(1 << i) for i in range(_BWD_TILE.bit_length())}
    variants = []
    for dtype in _TL_DTYPES.values():
        for block, one_block, num_warps in sorted(forward):
            constexprs = {"BLOCK": block, "ONE_BLOCK": one_block}
            variants.append((_kwta_forward_kernel, signature(_kwta_forward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": num_warps}))
        for block_g, block_l in sorted(backward):
            constexprs = {"BLOCK_G": block_g, "BLOCK_L": block_l}
            variants.append((_kwta_backward_kernel, signature(_kwta_backward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": _BWD_NUM_WARPS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
