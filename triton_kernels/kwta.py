"""k-WTA Triton kernels and launchers (contract: csrc/kwta.h, csrc/cpu/kwta.cpp).

x is an (N, C, L) view with any strides; each (n, c) row of L elements is a group.

Forward, groups of at most _FWD_MAX_BLOCK elements: one launch, one program per group. The
group is loaded once and kept in registers while a radix select finds its k-th largest key in
four passes of 8-bit digits (a 256-bin histogram of the candidates' next digit, the digit picked
by a cumulative count from the top bin); the same program writes out and the threshold.
Bytes: N*C*L*itemsize read + N*C*L*itemsize written (+ the threshold).

Forward, larger groups (L >= SPLIT_MIN_GROUP): four launches that split each group over many
programs (so a batch of one fills the GPU) and read x twice, as the CUDA kernel does:

1. _kwta_sample_kernel, one program per group: a sample of min(L, _SAMPLE) elements (runs of
   _RUN consecutive elements spread over the group) is selected at the ranks just above and below
   where the k-th largest should fall (a margin of 4 standard deviations of the sample rank, plus
   16), giving a key bracket [lo, hi]; zeroes the group's two counters.
   Bytes: N*C*min(L, _SAMPLE)*itemsize read, 16 per group written.
2. _kwta_filter_kernel, one program per chunk of BLOCK elements: counts the keys above hi and
   appends the values with lo <= key <= hi to the group's candidate buffer (at most cap values,
   cap = min(L, max(_CAND_MIN, L / 8)); counters by atomics). Bytes: N*C*L*itemsize read, the
   candidates written (a few % of L for data without an adversarial layout), 2 atomics per chunk.
3. _kwta_select_kernel, one program per group: when the bracket holds the k-th largest and its
   candidates fit, a radix select over the candidates only (four passes over n_in values, in
   L2); when lo == hi it is that key with no select; otherwise (a bracket missed) the exact
   streamed select over the whole group (four more passes over it, correct at any input).
   Bytes: 16 + 4 * n_in * itemsize read per group (4 * L * itemsize on a miss), itemsize written.
4. _kwta_mask_kernel, one program per chunk: out = x where kept. Bytes: N*C*L*itemsize read +
   N*C*L*itemsize written (+ one threshold per chunk).

(The chunk loops are `while` loops: Triton 3.6's interpreter cannot take a runtime bound in
range() with numpy >= 2.4.)

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
# _FWD_MAX_BLOCK elements lives in registers; larger ones take the split path.
_FWD_MIN_BLOCK = 32
_FWD_MAX_BLOCK = 4096
# The largest group: the streamed loop's int32 offset (start + lanes) must not overflow.
MAX_GROUP = 2**31 - 1 - _FWD_MAX_BLOCK
# Split path (see the module docstring). Tests lower these to run it on small groups.
SPLIT_MIN_GROUP = _FWD_MAX_BLOCK + 1  # groups of at least this many elements take it
_SPLIT_MIN_BLOCK = 1024  # smallest chunk of the filter and mask passes
_SPLIT_MAX_BLOCK = 4096
_SPLIT_TARGET_PROGRAMS = 2 * 132  # twice an H100/H200's SMs: chunks shrink until a pass has these
_SAMPLE = 4096  # sample size (elements) of the bracket
_RUN = 16  # consecutive elements per sample run: 64 bytes of float32, whole sectors
_CAND_MIN = 16384  # candidate buffer: min(L, max(_CAND_MIN, L // 8)) values per group
_SELECT_MAX_BLOCK = 2048  # the select's chunk (candidates are a few thousand values)
_SELECT_NUM_WARPS = 8
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


@triton.jit
def _select_in_block(keys, valid, rank):
    """The rank-th largest (1-based) of the valid keys of one block held in registers."""
    prefix = tl.zeros([], dtype=tl.uint32)
    prefix_mask = tl.zeros([], dtype=tl.uint32)
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        candidate = valid & ((keys & prefix_mask) == prefix)
        digits = ((keys >> shift) & (BINS - 1)).to(tl.int32)
        digit, rank = _pick_digit(tl.histogram(digits, BINS, mask=candidate), rank)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        prefix_mask = prefix_mask | tl.full([], (BINS - 1) << shift, tl.uint32)
    return prefix


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
):
    """A group of L <= BLOCK elements held in registers: select, threshold, masked write."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    in_group = lanes < L
    v = tl.load(x_ptr + n * x_sn + c * x_sc + lanes * x_sl, mask=in_group, other=0.0).to(tl.float32)
    threshold = _from_key(_select_in_block(_to_key(v, absolute), in_group, k))
    tl.store(threshold_ptr + group, threshold.to(threshold_ptr.dtype.element_ty))
    kept = tl.where(_keep(v, threshold, absolute), v, 0.0)
    tl.store(out_ptr + n * out_sn + c * out_sc + lanes * out_sl, kept.to(out_ptr.dtype.element_ty),
             mask=in_group)


@triton.jit(do_not_specialize=["absolute"])
def _kwta_sample_kernel(
    x_ptr, scratch_ptr,
    C, L, k, absolute,
    x_sn, x_sc, x_sl,
    SAMPLE: tl.constexpr,
    RUN: tl.constexpr,
):
    """Split path, step 1: the key bracket [lo, hi] of the k-th largest from a sample; scratch
    row (lo, hi, n_above = 0, n_in = 0) as int32."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    x_base = x_ptr + n * x_sn + c * x_sc
    s = tl.arange(0, SAMPLE).to(tl.int64)
    exact = L <= SAMPLE  # the sample is the group
    # L > SAMPLE: SAMPLE / RUN disjoint runs, RUN-aligned, spread evenly (no int64 division).
    spacing = (L // (SAMPLE // RUN)) // RUN * RUN
    pos = tl.where(exact, s, (s // RUN) * spacing + s % RUN)
    valid = (s < L) | (L > SAMPLE)
    v = tl.load(x_base + pos * x_sl, mask=valid, other=0.0).to(tl.float32)
    keys = _to_key(v, absolute)

    m = tl.minimum(L, SAMPLE)
    q = (k * 1.0) / (L * 1.0)  # (k may be a constexpr 1)
    r = q * m  # where the k-th largest of the group falls in the sample
    margin = 4.0 * tl.sqrt(m * q * (1.0 - q)) + 16.0
    r_hi = tl.floor(r - margin).to(tl.int32)
    r_lo = tl.ceil(r + margin).to(tl.int32)
    # Two selects in one rolled loop: unrolled, their live ranges overlap and spill.
    hi = tl.zeros([], dtype=tl.uint32)
    lo = tl.zeros([], dtype=tl.uint32)
    for t in range(2):
        key = _select_in_block(keys, valid, tl.where(t == 0, tl.maximum(r_hi, 1), tl.minimum(r_lo, m)))
        hi = tl.where(t == 0, key, hi)
        lo = tl.where(t == 0, lo, key)
    hi = tl.where(r_hi >= 1, hi, 0xFFFFFFFF)
    lo = tl.where(r_lo <= m, lo, 0)
    row = scratch_ptr + group * 4
    tl.store(row, lo.to(tl.int32, bitcast=True))
    tl.store(row + 1, hi.to(tl.int32, bitcast=True))
    tl.store(row + 2, 0)
    tl.store(row + 3, 0)


@triton.jit(do_not_specialize=["absolute"])
def _kwta_filter_kernel(
    x_ptr, scratch_ptr, cand_ptr,
    C, L, chunks, cap, absolute,
    x_sn, x_sc, x_sl,
    BLOCK: tl.constexpr,
):
    """Split path, step 2: per chunk, n_above += #(key > hi); the values with lo <= key <= hi
    appended to the group's candidates (n_in counts them all, only the first cap are kept)."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid // chunks
    n = group // C
    c = group % C
    offs = (pid % chunks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_group = offs < L
    raw = tl.load(x_ptr + n * x_sn + c * x_sc + offs * x_sl, mask=in_group, other=0.0)
    keys = _to_key(raw.to(tl.float32), absolute)
    row = scratch_ptr + group * 4
    lo = tl.load(row).to(tl.uint32, bitcast=True)
    hi = tl.load(row + 1).to(tl.uint32, bitcast=True)
    above = in_group & (keys > hi)
    inside = in_group & (keys >= lo) & (keys <= hi)
    tl.atomic_add(row + 2, tl.sum(above.to(tl.int32), 0))
    flags = inside.to(tl.int32)
    base = tl.atomic_add(row + 3, tl.sum(flags, 0))
    slot = base + tl.cumsum(flags, 0) - 1
    tl.store(cand_ptr + group * cap + slot, raw, mask=inside & (slot < cap))


@triton.jit(do_not_specialize=["absolute"])
def _kwta_select_kernel(
    x_ptr, threshold_ptr, scratch_ptr, cand_ptr,
    C, L, k, cap, absolute,
    x_sn, x_sc, x_sl,
    BLOCK: tl.constexpr,
):
    """Split path, step 3: the group's threshold from its candidates (or, where the bracket
    missed or overflowed, from the whole group)."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    row = scratch_ptr + group * 4
    lo = tl.load(row).to(tl.uint32, bitcast=True)
    hi = tl.load(row + 1).to(tl.uint32, bitcast=True)
    n_above = tl.load(row + 2)
    n_in = tl.load(row + 3)
    hit = (n_above < k) & (k <= n_above + n_in)
    tie = hit & (lo == hi)  # every candidate is the answer
    use_cand = hit & (n_in <= cap)
    src = tl.where(use_cand, cand_ptr + group * cap, x_ptr + n * x_sn + c * x_sc)
    stride = tl.where(use_cand, 1, x_sl).to(tl.int64)
    length = tl.where(tie, 0, tl.where(use_cand, n_in, L))
    rank = tl.where(use_cand, k - n_above, k)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    prefix = tl.zeros([], dtype=tl.uint32)
    prefix_mask = tl.zeros([], dtype=tl.uint32)
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        hist = tl.zeros([BINS], dtype=tl.int32)
        start = 0
        while start < length:
            offs = start + lanes
            ok = offs < length
            v = tl.load(src + offs * stride, mask=ok, other=0.0).to(tl.float32)
            keys = _to_key(v, absolute)
            candidate = ok & ((keys & prefix_mask) == prefix)
            digits = ((keys >> shift) & (BINS - 1)).to(tl.int32)
            hist += tl.histogram(digits, BINS, mask=candidate)
            start += BLOCK
        digit, rank = _pick_digit(hist, rank)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        prefix_mask = prefix_mask | tl.full([], (BINS - 1) << shift, tl.uint32)
    threshold = _from_key(tl.where(tie, lo, prefix))
    # program_id again rather than `group`: kept live across the loops, sm_80 spills it.
    tl.store(threshold_ptr + tl.program_id(0).to(tl.int64), threshold.to(threshold_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["absolute"])
def _kwta_mask_kernel(
    x_ptr, out_ptr, threshold_ptr,
    C, L, chunks, absolute,
    x_sn, x_sc, x_sl,
    out_sn, out_sc, out_sl,
    BLOCK: tl.constexpr,
):
    """Split path, step 4: out = x where kept, else 0, per chunk."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid // chunks
    n = group // C
    c = group % C
    offs = (pid % chunks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_group = offs < L
    threshold = tl.load(threshold_ptr + group).to(tl.float32)
    raw = tl.load(x_ptr + n * x_sn + c * x_sc + offs * x_sl, mask=in_group, other=0.0)
    keep = _keep(raw.to(tl.float32), threshold, absolute)
    tl.store(out_ptr + n * out_sn + c * out_sc + offs * out_sl, tl.where(keep, raw, 0.0).to(raw.dtype),
             mask=in_group)


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


def _forward_config(length: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for groups of ``length`` <= _FWD_MAX_BLOCK elements held in registers:
    a warp per 128 elements (4 keys per thread, under 128 registers without spills), at most 16."""
    block = max(triton.next_power_of_2(length), _FWD_MIN_BLOCK)
    return block, min(max(block // 128, 1), 16)


def _split_config(groups: int, length: int) -> tuple[int, int, int, int, int, int]:
    """(SAMPLE, RUN, sample num_warps, chunk BLOCK, chunk num_warps, select BLOCK) of the split
    path: chunks of at most _SPLIT_MAX_BLOCK elements, halved (down to _SPLIT_MIN_BLOCK) until a
    pass has _SPLIT_TARGET_PROGRAMS programs."""
    sample = min(_SAMPLE, triton.next_power_of_2(length))
    block = _SPLIT_MAX_BLOCK
    while block > _SPLIT_MIN_BLOCK and groups * triton.cdiv(length, block) < _SPLIT_TARGET_PROGRAMS:
        block //= 2
    select_block = min(_SELECT_MAX_BLOCK, triton.next_power_of_2(length))
    return (sample, min(_RUN, sample), min(max(sample // 256, 1), 16), block,
            min(max(block // 512, 1), 8), select_block)


def _candidate_cap(length: int) -> int:
    return min(length, max(_CAND_MIN, length // 8))


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
    if L >= SPLIT_MIN_GROUP or L > _FWD_MAX_BLOCK:
        _split_forward(x, k, int(absolute), out, threshold)
        return out, threshold
    block, num_warps = _forward_config(L)
    with on_device(x):
        _kwta_forward_kernel[(N * C,)](
            x, out, threshold,
            C, L, k, int(absolute),
            *x.stride(), *out.stride(),
            BLOCK=block, num_warps=num_warps,
        )
    return out, threshold


def _split_forward(x: torch.Tensor, k: int, absolute: int, out: torch.Tensor,
                   threshold: torch.Tensor) -> None:
    """The split path's four launches (module docstring); scratch: 16 bytes and cap candidate
    values per group (cap <= L: never more than x itself)."""
    N, C, L = x.shape
    groups = N * C
    sample, run, sample_warps, block, chunk_warps, select_block = _split_config(groups, L)
    cap = _candidate_cap(L)
    chunks = triton.cdiv(L, block)
    scratch = torch.empty((groups, 4), dtype=torch.int32, device=x.device)
    candidates = torch.empty((groups, cap), dtype=x.dtype, device=x.device)
    with on_device(x):
        _kwta_sample_kernel[(groups,)](
            x, scratch, C, L, k, absolute, *x.stride(),
            SAMPLE=sample, RUN=run, num_warps=sample_warps)
        _kwta_filter_kernel[(groups * chunks,)](
            x, scratch, candidates, C, L, chunks, cap, absolute, *x.stride(),
            BLOCK=block, num_warps=chunk_warps)
        _kwta_select_kernel[(groups,)](
            x, threshold, scratch, candidates, C, L, k, cap, absolute, *x.stride(),
            BLOCK=select_block, num_warps=_SELECT_NUM_WARPS)
        _kwta_mask_kernel[(groups * chunks,)](
            x, out, threshold, C, L, chunks, absolute, *x.stride(), *out.stride(),
            BLOCK=block, num_warps=chunk_warps)


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

    Configs change only at powers of two of L (and, for the split path's chunk, of the number
    of groups), so sampling L = 2**i and the smallest and a large group count covers them all."""
    forward = {_forward_config(1 << i) for i in range(_FWD_MAX_BLOCK.bit_length())}
    backward = {_backward_config(1 << i) for i in range(_BWD_TILE.bit_length())}
    # The split path's configs: SAMPLE, chunk and select blocks are powers of two within bounds.
    split = {_split_config(groups, 1 << i) for i in range(SPLIT_MIN_GROUP.bit_length() - 1, 32)
             for groups in (1, 1 << 20)}
    sample_cfgs = sorted({(sample, run, warps) for sample, run, warps, _, _, _ in split})
    chunk_cfgs = sorted({(block, warps) for _, _, _, block, warps, _ in split})
    select_blocks = sorted({select for *_, select in split})
    variants = []
    for dtype in _TL_DTYPES.values():
        for sample, run, warps in sample_cfgs:
            constexprs = {"SAMPLE": sample, "RUN": run}
            variants.append((_kwta_sample_kernel, signature(_kwta_sample_kernel, dtype, constexprs,
                                                            {"scratch_ptr": "*i32"}),
                             constexprs, {"num_warps": warps}))
        for block, warps in chunk_cfgs:
            constexprs = {"BLOCK": block}
            variants.append((_kwta_filter_kernel, signature(_kwta_filter_kernel, dtype, constexprs,
                                                            {"scratch_ptr": "*i32"}),
                             constexprs, {"num_warps": warps}))
            variants.append((_kwta_mask_kernel, signature(_kwta_mask_kernel, dtype, constexprs),
                             constexprs, {"num_warps": warps}))
        for block in select_blocks:
            constexprs = {"BLOCK": block}
            variants.append((_kwta_select_kernel, signature(_kwta_select_kernel, dtype, constexprs,
                                                            {"scratch_ptr": "*i32"}),
                             constexprs, {"num_warps": _SELECT_NUM_WARPS}))
        for block, num_warps in sorted(forward):
            constexprs = {"BLOCK": block}
            variants.append((_kwta_forward_kernel, signature(_kwta_forward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": num_warps}))
        for block_g, block_l in sorted(backward):
            constexprs = {"BLOCK_G": block_g, "BLOCK_L": block_l}
            variants.append((_kwta_backward_kernel, signature(_kwta_backward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": _BWD_NUM_WARPS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
