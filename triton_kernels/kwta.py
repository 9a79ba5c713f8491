"""k-WTA Triton kernels and launchers (contract: csrc/kwta.h, csrc/cpu/kwta.cpp).

x is an (N, C, L) view with any strides; each (n, c) row of L elements is a group.

Keys are uint32 (below) whose order is the values'. Selects of the k-th largest key:
- a group of at most _FWD_MAX_BLOCK in registers (_select_count): one bit a pass, by counting
  the keys at or above the upper half of the current bucket (a compare and an add a key, then
  a block sum), stopping once the wanted key is the bucket's largest or smallest (then one max
  reduction finds it): ~log2(L) + 5 passes for spread-out data (15 for 1024 N(0, 1) values),
  32 at most (ties). Instructions a key, not passes, bound it: 32 keys a thread;
- radix passes over digits of 5 bits (a 32-bin tl.histogram costs ~40 sm_90 instructions an
  element, a 256-bin one ~75: 7 passes of 5 bits cost less than 4 of 8), a digit picked by a
  cumulative count from the top bin: the split path's bin of candidates in registers
  (_select_radix: a key or so a thread, where fewer passes mean less latency), the streamed
  fallback (_select_streamed: each pass a read of memory) and the sample's bracket (_bracket).
Keys lo <= key <= hi share the bits above bit_length(lo ^ hi), which a select restricted to
[lo, hi] skips.

Forward, groups of at most _FWD_MAX_BLOCK elements: one launch, one program per group. The
group is loaded once and kept in registers (32 keys a thread where it has stride 1, 8 else;
no lane masks where L is the block's power of two) while the counting select finds its k-th
largest key; the same program writes out (a key compare an element) and the threshold.
Bytes: N*C*L*itemsize read + N*C*L*itemsize written (+ the threshold).

Forward, larger groups (L >= SPLIT_MIN_GROUP): three launches that split each group over many
programs (so a batch of one fills the GPU), reading x once and writing out once:

1. _kwta_sample_kernel, one program per group: a sample of m = L / 64 elements within
   [_SAMPLE_MIN, _SAMPLE] (the group itself if smaller; runs of _RUN consecutive elements, one
   per span of L / (m / _RUN) at a hashed offset in it) is selected at the ranks just above and
   below where the k-th largest should fall (a margin of 4 standard deviations of the sample
   rank, plus 16): both selects share each pass (a 64-bin histogram) and stop after 3 passes
   (15-bit buckets) once their prefixes differ, giving a key bracket [lo, hi] (exact keys where
   they never differ: a tie, lo == hi). Writes the group's scratch row (lo, hi, the shift of
   its _BAND_BINS bins over [lo, hi], zeroed counters) and zeroes its bin counts.
   Bytes: N*C*m*itemsize read, 32 + 4 * _BAND_BINS per group written.
2. _kwta_filter_kernel, one program per chunk of BLOCK elements: out = x for keys above hi, 0
   for keys below lo and, in the band lo <= key <= hi, 0 (x in a tie: every band key is then
   the threshold if the bracket holds it); n_above += #(key > hi) and n_in += #(band) by
   atomics; each band value is appended with its position to the group's candidates (the first
   cap = min(L, max(_CAND_MIN, L / 8)) are kept) and counted in its bin (an atomic a band
   element). Every atomic is relaxed (the launch boundary orders them before launch 3): Triton's
   default, acq_rel, puts a MEMBAR.ALL.GPU (a wait for every store of the thread in flight) and
   an L1 invalidation around each: with 11 of them (and the group's last program finishing the
   group in this launch), the H200 run measured ~11 us a program of 2048 elements.
3. _kwta_finish_kernel, one program per group (_finish_group):
   - bracket hit (n_above < k <= n_above + n_in), no tie, candidates within cap: the bin b
     holding the (k - n_above)-th largest candidate from the bin counts; one scan of the
     candidates (TAIL at a time) stores those above bin b into out and gathers bin b's (the
     first _BIN_CAP, with positions); the threshold is selected within bin b's key range from
     that list in registers (or, past _BIN_CAP, streamed over the candidates), and bin b's
     values at or above it are stored into out;
   - a hit in a tie: the threshold is lo, out is already complete;
   - a miss or more candidates than cap (adversarial data): the exact select streamed over the
     whole group (7 passes), then out rewritten for the whole group by this program.
   The threshold and out depend on no atomic's order (candidate order does not matter).
   Bytes: N*C*L*itemsize read + N*C*L*itemsize written (launch 2), the candidates written (value
   and int32 position: n_in * (itemsize + 4), ~5-11% of L for data without an adversarial
   layout) and read back once (L2), a bin-count atomic per candidate, 2 atomics a program,
   and the kept band values stored again into out (scattered: a sector each).

(The loops are `while` loops: Triton 3.6's interpreter cannot take a runtime bound in range()
with numpy >= 2.4.)

Keys are uint32 whose order is the float order of the values (of |x| if absolute; half types
go through float32, which keeps their order), with NaN mapped to the largest key, as torch.topk
ranks NaN, and -0 mapped to +0's key (they tie under the mask's >=). The whole-group rewrite
compares values: -0 and +0 tie there too.

Backward: one elementwise launch over (group, element) tiles reading each group's threshold.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import signature
from .cas import cdiv, next_pow2, on_device

DIGIT_BITS = tl.constexpr(5)  # radix digits of the streamed select and the bracket
BINS = tl.constexpr(1 << 5)
# Forward block sizes: the next power of two of L within these bounds. A group held in
# registers (_in_registers): a power of two of up to _FWD_MAX_BLOCK elements with stride 1 (a
# program of up to 8 warps, 32 keys a thread; ~17 select passes for 8192 N(0, 1) values, a
# shorter chain than the split path's three launches), any other of up to _FWD_MAX_MASKED (16
# keys a thread, 8 if strided: lane masks and int64 addresses take registers, and fewer keys
# keep 25% occupancy); larger ones take the split path.
_FWD_MIN_BLOCK = 32
_FWD_MAX_BLOCK = 8192
_FWD_MAX_MASKED = 4096
# The largest group: the streamed loops' int32 offset (start + lanes) must not overflow.
MAX_GROUP = 2**31 - 1 - _FWD_MAX_BLOCK
# Split path (see the module docstring). Tests lower these to run it on small groups.
SPLIT_MIN_GROUP = _FWD_MAX_BLOCK + 1  # groups of at least this many take it (and _in_registers' others)
_SPLIT_MIN_BLOCK = 1024  # smallest chunk of the filter pass
_SPLIT_MAX_BLOCK = 2048
_SPLIT_TARGET_PROGRAMS = 2 * 132  # twice an H100/H200's SMs: chunks shrink until a pass has these
_SAMPLE = 4096  # largest sample (elements) of the bracket
_SAMPLE_MIN = 1024  # smallest sample of a group larger than it (the sample is L // 64 between)
_RUN = 16  # consecutive elements per sample run: 64 bytes of float32, whole sectors
_CAND_MIN = 16384  # candidate buffer: min(L, max(_CAND_MIN, L // 8)) values per group
_BAND_BINS = 1024  # bins of the bracket's key range counted by the filter pass
_BIN_CAP = 256  # candidates of the threshold's bin selected in registers (more: streamed)
_TAIL = 2048  # the finish program's chunk over the candidates (8 warps: 8 a thread)
_CHUNK_WARPS = 8
_FINISH_WARPS = 8
_FINISH_MAX_REGS = 128  # ptxas's own choice spills on sm_80 (80 registers, a 24-byte frame)
_SCRATCH = 8  # int32 a group: lo, hi, bin shift, n_above, n_in (the rest unused, zero)
# Backward tiles hold _BWD_TILE elements: _BWD_TILE // BLOCK_L groups of BLOCK_L elements.
_BWD_MIN_BLOCK_L = 16
_BWD_TILE = 1024
_BWD_NUM_WARPS = 4

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _to_key(v, absolute):
    """uint32 keys ordered like v (or |v| if absolute), NaN largest, -0 equal to +0 (as the
    mask's >= has them)."""
    bits = v.to(tl.uint32, bitcast=True) & tl.where(absolute != 0, 0x7FFFFFFF, 0xFFFFFFFF)
    bits = tl.where(bits == 0x80000000, 0, bits)
    # Negative values: flip every bit (reverses their order); others: set the sign bit.
    # XOR with a constant rather than ~, which the interpreter cannot apply to uint32.
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return tl.where(v != v, 0xFFFFFFFF, key)


@triton.jit
def _from_key(key):
    bits = key ^ tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _f32(v):
    """v as float32; bfloat16 by its bits, since the interpreter's bfloat16 -> float32
    conversion flushes subnormals (on the GPU the same value)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _exact(v, dtype: tl.constexpr):
    """float32 v, a value of dtype (a group's element), in dtype: bfloat16 by its high 16 bits
    (exact: v came from a bfloat16), as _f32 for the interpreter's subnormals."""
    if dtype == tl.bfloat16:
        return (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _keep(v, threshold, absolute):
    key = tl.where(absolute != 0, tl.abs(v), v)
    return (key >= threshold) | (v != v)


@triton.jit
def _low_mask(bits):
    """uint32 with the low `bits` (0..32) bits set; two shifts, each below 32."""
    bits = bits.to(tl.uint32)
    half = bits // 2
    return ((tl.full([], 1, tl.uint32) << half) << (bits - half)) - 1


@triton.jit
def _bit_length(x):
    """Bits of the uint32 x (0 for 0)."""
    n = tl.zeros([], dtype=tl.int32)
    y = x
    while y != 0:
        y = y >> 1
        n += 1
    return n


@triton.jit
def _pick_digit(hist, rank):
    """The digit whose bucket holds the rank-th largest candidate (rank 1-based from the top),
    and the rank within that bucket."""
    bins = tl.arange(0, hist.shape[0])
    from_top = tl.cumsum(hist, 0, reverse=True)
    digit = tl.max(tl.where(from_top >= rank, bins, 0), 0)
    above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    return digit, rank - above


@triton.jit
def _select_radix(keys, valid, rank, lo, hi, run):
    """The rank-th largest (1-based) of the valid keys within [lo, hi], held in registers (lo
    when run is 0), by radix passes of DIGIT_BITS: the split path's bin of at most _BIN_CAP
    candidates, a key or so a thread, where a pass's latency (its block reductions), not its
    instructions, counts: 5 bits a pass take fewer passes than _select_count's one."""
    bits = tl.where(run != 0, _bit_length(lo ^ hi), 0)
    known = _low_mask(bits) ^ 0xFFFFFFFF
    prefix = lo & known
    inside = valid & (keys >= lo) & (keys <= hi)
    while bits > 0:
        width = tl.minimum(bits, DIGIT_BITS)
        shift = (bits - width).to(tl.uint32)
        match = inside & ((keys & known) == prefix)
        digits = ((keys >> shift) & _low_mask(width)).to(tl.int32)
        digit, rank = _pick_digit(tl.histogram(digits, BINS, mask=match), rank)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        known = known | (_low_mask(width) << shift)
        bits -= width
    return prefix


@triton.jit
def _select_count(keys, valid, rank, lo, hi, run, count):
    """The rank-th largest (1-based) of the valid keys within [lo, hi], held in registers (lo
    when run is 0); `count` is the number of those keys (the caller knows it). Such keys share
    the bits of lo above bit_length(lo ^ hi); the rest are found one bit a pass, from the
    bit's bucket [prefix, prefix + 2^bits): the keys at or above its upper half are counted
    (a compare and an add a key: no histogram, whose 32 bins cost ~40 instructions a key for
    5 bits) and the rank-th largest is in the upper half if at least `need` of them are. The
    passes stop once the rank-th largest is the bucket's largest or smallest key (for
    spread-out data after ~log2 of the group's size), which one max reduction then finds; ties
    run all the bits. The result is the same key either way."""
    bits = tl.where(run != 0, _bit_length(lo ^ hi), 0)
    prefix = lo & (_low_mask(bits) ^ 0xFFFFFFFF)
    # Keys outside the select counted as 0, which no bucket's upper half reaches (it is >= 1;
    # no float's key is 0: the negative NaN bits that would flip to it are mapped to NaN's).
    mine = tl.where(valid & (keys >= lo) & (keys <= hi), keys, 0)
    pop = count + tl.zeros([], dtype=tl.int32)  # keys in the bucket
    above = tl.zeros([], dtype=tl.int32)  # keys above the bucket
    need = rank + tl.zeros([], dtype=tl.int32)  # the rank within the bucket
    while (bits > 0) & (need != 1) & (need != pop):
        bits -= 1
        half = prefix | (tl.full([], 1, tl.uint32) << bits.to(tl.uint32))
        upper = tl.sum((mine >= half).to(tl.int32), 0) - above
        take = upper >= need
        prefix = tl.where(take, half, prefix)
        above = tl.where(take, above, above + upper)
        need = tl.where(take, need, need - upper)
        pop = tl.where(take, upper, pop - upper)
    # The bucket's largest key (need == 1) or its smallest (the max of the flipped keys).
    top = prefix | _low_mask(bits)
    flip = tl.where(need == 1, 0, 0xFFFFFFFF).to(tl.uint32)
    in_bucket = (mine >= prefix) & (mine <= top) & (mine != 0)
    last = tl.max(tl.where(in_bucket, mine ^ flip, 0), 0) ^ flip
    return tl.where(bits > 0, last, prefix)


@triton.jit
def _select_streamed(src, stride, length, rank, lo, hi, absolute, BLOCK: tl.constexpr):
    """_select_radix over `length` values at src (a stride apart) streamed from memory in
    BLOCK chunks, a pass each digit; no pass when length is 0."""
    rank = rank + tl.zeros([], dtype=tl.int32)  # a tensor across the loop (k may be a constexpr 1)
    bits = tl.where(length > 0, _bit_length(lo ^ hi), 0)
    known = _low_mask(bits) ^ 0xFFFFFFFF
    prefix = lo & known
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    while bits > 0:
        width = tl.minimum(bits, DIGIT_BITS)
        shift = (bits - width).to(tl.uint32)
        hist = tl.zeros([BINS], dtype=tl.int32)
        start = 0
        while start < length:
            offs = start + lanes
            ok = offs < length
            v = tl.load(src + offs * stride, mask=ok, other=0.0, cache_modifier=".cg")
            keys = _to_key(_f32(v), absolute)
            match = ok & (keys >= lo) & (keys <= hi) & ((keys & known) == prefix)
            digits = ((keys >> shift) & _low_mask(width)).to(tl.int32)
            hist += tl.histogram(digits, BINS, mask=match)
            start += BLOCK
        digit, rank = _pick_digit(hist, rank)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        known = known | (_low_mask(width) << shift)
        bits -= width
    return prefix


@triton.jit
def _bracket(keys, valid, r_hi, r_lo):
    """(lo, hi): lo <= the r_lo-th largest valid key <= the r_hi-th <= hi (r_hi <= r_lo). Both
    radix selects share a pass (one 64-bin histogram: the hi prefix's digits, then the lo
    prefix's) and stop after three passes (15 bits) once their prefixes differ; lo and hi
    are the ends of their last buckets (exact keys where the prefixes never differ)."""
    known = tl.zeros([], dtype=tl.uint32)
    p_hi = tl.zeros([], dtype=tl.uint32)
    p_lo = tl.zeros([], dtype=tl.uint32)
    bits = tl.full([], 32, tl.int32)
    passes = tl.zeros([], dtype=tl.int32)
    rows = tl.arange(0, 2)[:, None]
    while (bits > 0) & ((passes < 3) | (p_hi == p_lo)):
        width = tl.minimum(bits, DIGIT_BITS)
        shift = (bits - width).to(tl.uint32)
        high = (keys & known) == p_hi
        low = (keys & known) == p_lo
        digits = ((keys >> shift) & _low_mask(width)).to(tl.int32) + tl.where(high, 0, BINS)
        both = tl.reshape(tl.histogram(digits, 2 * BINS, mask=valid & (high | low)), [2, BINS])
        h_hi = tl.sum(tl.where(rows == 0, both, 0), 0)
        h_lo = tl.where(p_hi == p_lo, h_hi, tl.sum(tl.where(rows == 1, both, 0), 0))
        d_hi, r_hi = _pick_digit(h_hi, r_hi)
        d_lo, r_lo = _pick_digit(h_lo, r_lo)
        p_hi = p_hi | (d_hi.to(tl.uint32) << shift)
        p_lo = p_lo | (d_lo.to(tl.uint32) << shift)
        known = known | (_low_mask(width) << shift)
        bits -= width
        passes += 1
    return p_lo, p_hi | _low_mask(bits)


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
    UNIT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """A group of L <= BLOCK elements held in registers: select, threshold, masked write.
    UNIT: x and out have stride 1 along the group (a thread's elements at constant offsets of
    one address, int32 lane offsets), else any strides (an int64 address an element). EVEN:
    L == BLOCK (no lane masks)."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    lanes = tl.arange(0, BLOCK)
    if UNIT:
        x_offs = lanes
        out_offs = lanes
    else:
        x_offs = lanes.to(tl.int64) * x_sl
        out_offs = lanes.to(tl.int64) * out_sl
    x_row = x_ptr + (n * x_sn + c * x_sc) + x_offs
    out_row = out_ptr + (n * out_sn + c * out_sc) + out_offs
    if EVEN:
        in_group = tl.full([BLOCK], 1, tl.int1)
        raw = tl.load(x_row)
    else:
        in_group = lanes < L
        raw = tl.load(x_row, mask=in_group, other=0.0)
    keys = _to_key(_f32(raw), absolute)
    key = _select_count(keys, in_group, k, tl.full([], 0, tl.uint32),
                        tl.full([], 0xFFFFFFFF, tl.uint32), tl.full([], 1, tl.int32), L)
    tl.store(threshold_ptr + group, _exact(_from_key(key), threshold_ptr.dtype.element_ty))
    # key(v) >= key(threshold) is _keep(v, threshold): the keys order the values (NaN largest,
    # -0 as +0), one integer compare an element.
    kept = tl.where(keys >= key, raw, tl.zeros_like(raw))
    if EVEN:
        tl.store(out_row, kept)
    else:
        tl.store(out_row, kept, mask=in_group)


@triton.jit(do_not_specialize=["absolute"])
def _kwta_sample_kernel(
    x_ptr, scratch_ptr, hist_ptr,
    C, L, k, absolute,
    x_sn, x_sc, x_sl,
    SAMPLE: tl.constexpr,
    RUN: tl.constexpr,
    NBINS: tl.constexpr,
):
    """Split path, launch 1: the key bracket [lo, hi] of the k-th largest from a sample; the
    group's scratch row (lo, hi, bin shift, n_above = 0, n_in = 0, zeros) and zeroed bin
    counts."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    x_base = x_ptr + n * x_sn + c * x_sc
    s = tl.arange(0, SAMPLE).to(tl.int64)
    exact = L <= SAMPLE  # the sample is the group
    # L > SAMPLE: SAMPLE / RUN disjoint runs, one per `spacing` elements, each at a hashed
    # RUN-aligned offset inside its span (a period of the data equal to the spacing, such as
    # a channel's plane, does not put every run at the same place of it).
    spacing = (L // (SAMPLE // RUN)) // RUN * RUN
    run = s // RUN
    slots = tl.maximum(spacing // RUN, 1)
    jitter = (((run.to(tl.uint32) * 0x9E3779B1) >> 12).to(tl.int64) % slots) * RUN
    pos = tl.where(exact, s, run * spacing + jitter + s % RUN)
    valid = (s < L) | (L > SAMPLE)
    v = _f32(tl.load(x_base + pos * x_sl, mask=valid, other=0.0))
    keys = _to_key(v, absolute)

    m = tl.minimum(L, SAMPLE)
    q = (k * 1.0) / (L * 1.0)  # (k may be a constexpr 1)
    r = q * m  # where the k-th largest of the group falls in the sample
    margin = 4.0 * tl.sqrt(m * q * (1.0 - q)) + 16.0
    r_hi = tl.floor(r - margin).to(tl.int32)
    r_lo = tl.ceil(r + margin).to(tl.int32)
    lo, hi = _bracket(keys, valid, tl.maximum(r_hi, 1), tl.minimum(r_lo, m))
    hi = tl.where(r_hi >= 1, hi, 0xFFFFFFFF)
    lo = tl.where(r_lo <= m, lo, 0)
    # Bins of the band: (key - lo) >> shift < NBINS.
    shift = tl.maximum(_bit_length(hi - lo) - _bit_length(tl.full([], NBINS - 1, tl.uint32)), 0)
    row = scratch_ptr + group * 8
    tl.store(row, lo.to(tl.int32, bitcast=True))
    tl.store(row + 1, hi.to(tl.int32, bitcast=True))
    tl.store(row + 2, shift)
    for i in tl.static_range(3, 8):
        tl.store(row + i, 0)
    tl.store(hist_ptr + group * NBINS + tl.arange(0, NBINS), tl.zeros([NBINS], dtype=tl.int32))


@triton.jit
def _bracket_row(scratch_ptr, group):
    """The group's scratch row and the bracket _kwta_sample_kernel left in it: (row, lo, hi,
    the bin shift)."""
    row = scratch_ptr + group * 8
    lo = tl.load(row).to(tl.uint32, bitcast=True)
    hi = tl.load(row + 1).to(tl.uint32, bitcast=True)
    return row, lo, hi, tl.load(row + 2)


@triton.jit
def _candidates(cand_row, pos_row, i, ok, absolute):
    """Candidates i of a group (value, position, key), read past L1 (the filter launch's
    programs stored them)."""
    v = tl.load(cand_row + i, mask=ok, other=0.0, cache_modifier=".cg")
    p = tl.load(pos_row + i, mask=ok, other=0, cache_modifier=".cg").to(tl.int64)
    return v, p, _to_key(_f32(v), absolute)


@triton.jit
def _finish_group(
    x_base, out_base, threshold_ptr, row, hist_row, cand_row, pos_row, list_row, list_pos_row,
    group, L, k, cap, absolute, lo, hi, shift,
    x_sl, out_sl,
    TAIL: tl.constexpr, NBINS: tl.constexpr, BIN_CAP: tl.constexpr,
):
    """Split path, launch 3 (a program per group): the threshold and the fix-up of the band's
    candidates (module docstring)."""
    n_above = tl.load(row + 3, cache_modifier=".cg")
    n_in = tl.load(row + 4, cache_modifier=".cg")
    hit = (n_above < k) & (k <= n_above + n_in)
    tie = lo == hi
    fast = hit & (lo != hi) & (n_in <= cap)
    whole = (hit == 0) | ((lo != hi) & (n_in > cap))
    rank = k - n_above
    # The bin holding the rank-th largest candidate and the rank within it.
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_row + bins, mask=(bins >= 0) & fast, other=0, cache_modifier=".cg")
    b, rank_b = _pick_digit(hist, rank)
    count_b = tl.sum(tl.where(bins == b, hist, 0), 0)
    b_lo = lo + (b.to(tl.uint32) << shift.to(tl.uint32))
    b_hi = b_lo + tl.minimum(_low_mask(shift), hi - b_lo)
    # 1. The candidates above bin b are kept; bin b's go to the bin list (the first BIN_CAP).
    lanes = tl.arange(0, TAIL)
    length = tl.where(fast, n_in, 0)
    gathered = tl.zeros([], dtype=tl.int32)
    start = 0
    while start < length:
        i = start + lanes
        ok = i < length
        v, p, keys = _candidates(cand_row, pos_row, i, ok, absolute)
        tl.store(out_base + p * out_sl, v, mask=ok & (keys > b_hi))
        mine = ok & (keys >= b_lo) & (keys <= b_hi)
        slot = gathered + tl.cumsum(mine.to(tl.int32), 0) - 1
        tl.store(list_row + slot, v, mask=mine & (slot < BIN_CAP))
        tl.store(list_pos_row + slot, p.to(tl.int32), mask=mine & (slot < BIN_CAP))
        gathered += tl.sum(mine.to(tl.int32), 0)
        start += TAIL
    tl.debug_barrier()  # the bin list, stored by this program's threads, is read back below
    # 2. The threshold: within bin b from the list (registers) or, past BIN_CAP, streamed over
    # the candidates; over the whole group where the bracket missed or the candidates overflowed.
    small = fast & (count_b <= BIN_CAP)
    big = fast & (count_b > BIN_CAP)
    j = tl.arange(0, BIN_CAP)
    listed = j < tl.where(small, count_b, 0)
    lv = tl.load(list_row + j, mask=listed, other=0.0)
    lp = tl.load(list_pos_row + j, mask=listed, other=0).to(tl.int64)
    lkeys = _to_key(_f32(lv), absolute)
    t_small = _select_radix(lkeys, listed, rank_b, b_lo, b_hi, small.to(tl.int32))
    t_big = _select_streamed(cand_row, 1, tl.where(big, n_in, 0), rank_b, b_lo, b_hi, absolute, TAIL)
    t_whole = _select_streamed(x_base, x_sl, tl.where(whole, L, 0), k, tl.full([], 0, tl.uint32),
                               tl.full([], 0xFFFFFFFF, tl.uint32), absolute, TAIL)
    key = tl.where(small, t_small, tl.where(big, t_big, tl.where(whole, t_whole, lo)))
    threshold = _from_key(key)
    tl.store(threshold_ptr + group, _exact(threshold, threshold_ptr.dtype.element_ty))
    # 3. Bin b's kept candidates (from the list, or streamed again); or the whole group rewritten.
    tl.store(out_base + lp * out_sl, lv, mask=listed & (lkeys >= key))
    length = tl.where(big, n_in, 0)
    start = 0
    while start < length:
        i = start + lanes
        ok = i < length
        v, p, keys = _candidates(cand_row, pos_row, i, ok, absolute)
        tl.store(out_base + p * out_sl, v, mask=ok & (keys >= key) & (keys >= b_lo) & (keys <= b_hi))
        start += TAIL
    length = tl.where(whole, L, 0)
    start = 0
    while start < length:
        i = start + lanes
        ok = i < length
        raw = tl.load(x_base + i.to(tl.int64) * x_sl, mask=ok, other=0.0)
        keep = _keep(_f32(raw), threshold, absolute)
        tl.store(out_base + i.to(tl.int64) * out_sl, tl.where(keep, raw, tl.zeros_like(raw)), mask=ok)
        start += TAIL


@triton.jit(do_not_specialize=["absolute"])
def _kwta_filter_kernel(
    x_ptr, out_ptr, scratch_ptr, hist_ptr, cand_ptr, pos_ptr,
    C, L, chunks, cap, absolute,
    x_sn, x_sc, x_sl,
    out_sn, out_sc, out_sl,
    BLOCK: tl.constexpr,
    NBINS: tl.constexpr,
):
    """Split path, launch 2, a program per chunk of BLOCK elements: out for the keys outside
    the bracket (above: x, below: 0; inside: 0, or x in a tie), n_above += #(key > hi), the
    values with lo <= key <= hi appended with their positions to the group's candidates (n_in
    counts them all, the first cap are kept) and counted in their bins. Relaxed atomics only,
    and no wait for the group's other programs: _kwta_finish_kernel, the next launch, completes
    the group."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid // chunks
    n = group // C
    c = group % C
    offs = (pid % chunks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_group = offs < L
    x_base = x_ptr + n * x_sn + c * x_sc
    out_base = out_ptr + n * out_sn + c * out_sc
    raw = tl.load(x_base + offs * x_sl, mask=in_group, other=0.0)
    keys = _to_key(_f32(raw), absolute)
    row, lo, hi, shift = _bracket_row(scratch_ptr, group)
    band = lo != hi  # lo == hi: a tie, every candidate is kept if the bracket holds
    above = in_group & (keys > hi)
    inside = in_group & (keys >= lo) & (keys <= hi)
    tl.store(out_base + offs * out_sl, tl.where(above | (inside & (lo == hi)), raw, tl.zeros_like(raw)),
             mask=in_group)
    tl.atomic_add(row + 3, tl.sum(above.to(tl.int32), 0), sem="relaxed")
    flags = inside.to(tl.int32)
    base = tl.atomic_add(row + 4, tl.sum(flags, 0), sem="relaxed")
    slot = base + tl.cumsum(flags, 0) - 1
    listed = inside & band & (slot < cap)
    tl.store(cand_ptr + group * cap + slot, raw, mask=listed)
    tl.store(pos_ptr + group * cap + slot, offs.to(tl.int32), mask=listed)
    tl.atomic_add(hist_ptr + group * NBINS + ((keys - lo) >> shift.to(tl.uint32)).to(tl.int32), 1,
                  mask=inside & band, sem="relaxed")


@triton.jit(do_not_specialize=["absolute"])
def _kwta_finish_kernel(
    x_ptr, out_ptr, threshold_ptr, scratch_ptr, hist_ptr, cand_ptr, pos_ptr, list_ptr, list_pos_ptr,
    C, L, k, cap, absolute,
    x_sn, x_sc, x_sl,
    out_sn, out_sc, out_sl,
    TAIL: tl.constexpr,
    NBINS: tl.constexpr,
    BIN_CAP: tl.constexpr,
):
    """Split path, launch 3, a program per group: the threshold and the fix-up of the band's
    candidates (_finish_group), from the counters, bin counts and candidates the filter left."""
    group = tl.program_id(0).to(tl.int64)
    n = group // C
    c = group % C
    row, lo, hi, shift = _bracket_row(scratch_ptr, group)
    _finish_group(x_ptr + n * x_sn + c * x_sc, out_ptr + n * out_sn + c * out_sc, threshold_ptr,
                  row, hist_ptr + group * NBINS, cand_ptr + group * cap, pos_ptr + group * cap,
                  list_ptr + group * BIN_CAP, list_pos_ptr + group * BIN_CAP,
                  group, L, k, cap, absolute, lo, hi, shift, x_sl, out_sl,
                  TAIL, NBINS, BIN_CAP)


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
    threshold = _f32(tl.load(threshold_ptr + n * t_sn + c * t_sc, mask=row_ok, other=0.0))
    x = tl.load(x_ptr + (n * x_sn + c * x_sc)[:, None] + elems[None, :] * x_sl, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + (n * g_sn + c * g_sc)[:, None] + elems[None, :] * g_sl, mask=mask, other=0.0)
    keep = _keep(_f32(x), threshold[:, None], absolute)
    tl.store(out_ptr + (n * out_sn + c * out_sc)[:, None] + elems[None, :] * out_sl,
             tl.where(keep, grad, 0.0).to(grad.dtype), mask=mask)


def _in_registers(length: int, unit: bool = True) -> bool:
    """Whether a group of ``length`` elements (``unit``: stride 1 in x and out) is held in
    registers by _kwta_forward_kernel (else the split path)."""
    if length >= SPLIT_MIN_GROUP:
        return False
    return length <= _FWD_MAX_MASKED or (unit and length == _FWD_MAX_BLOCK)


def _forward_config(length: int, unit: bool = True) -> tuple[int, int]:
    """(BLOCK, num_warps) for groups of ``length`` elements held in registers. Keys a thread:
    32 where L is the block's power of two and the group has stride 1 (EVEN and UNIT: no lane
    masks), so that a select pass's fixed part (the block sum, the bucket update: ~30
    instructions) is spread over many keys (sm_90 SASS of the 1024-element block: 124
    instructions a pass for 32 keys, 85 for 16, 49 for 4; 92 registers); 16 with lane masks
    (32 would take 168 registers: 19% occupancy); 8 for strided groups (an int64 address a
    key, which 16 keys would move into a stack frame at 2048). At most 8 warps."""
    block = max(next_pow2(length), _FWD_MIN_BLOCK)
    keys = 32 if unit and length == block else 16 if unit else 8
    return block, min(max(block // (32 * keys), 1), 8)


def _split_config(groups: int, length: int) -> tuple[int, int, int, int, int]:
    """(SAMPLE, RUN, sample num_warps, chunk BLOCK, chunk num_warps) of the split path: a sample
    of L / 64 elements within [_SAMPLE_MIN, _SAMPLE] (a power of two, the group itself if
    smaller); chunks of at most _SPLIT_MAX_BLOCK elements, halved (down to _SPLIT_MIN_BLOCK)
    until the filter pass has _SPLIT_TARGET_PROGRAMS programs."""
    pow2 = next_pow2(length)
    sample = min(_SAMPLE, max(_SAMPLE_MIN, pow2 // 64), pow2)
    block = _SPLIT_MAX_BLOCK
    while block > _SPLIT_MIN_BLOCK and groups * cdiv(length, block) < _SPLIT_TARGET_PROGRAMS:
        block //= 2
    return sample, min(_RUN, sample), min(max(sample // 256, 1), 16), block, _CHUNK_WARPS


def _candidate_cap(length: int) -> int:
    return min(length, max(_CAND_MIN, length // 8))


def _backward_config(length: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_L) for groups of ``length`` elements."""
    block_l = min(max(next_pow2(length), _BWD_MIN_BLOCK_L), _BWD_TILE)
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
    unit = x.stride(2) == 1 and out.stride(2) == 1
    if not _in_registers(L, unit):
        _split_forward(x, k, int(absolute), out, threshold)
        return out, threshold
    block, num_warps = _forward_config(L, unit)
    with on_device(x):
        _kwta_forward_kernel[(N * C,)](
            x, out, threshold,
            C, L, k, int(absolute),
            *x.stride(), *out.stride(),
            BLOCK=block, UNIT=unit, EVEN=unit and L == block, num_warps=num_warps,
        )
    return out, threshold


def _split_forward(x: torch.Tensor, k: int, absolute: int, out: torch.Tensor,
                   threshold: torch.Tensor) -> None:
    """The split path's three launches (module docstring). Scratch per group: _SCRATCH int32,
    _BAND_BINS bin counts, cap candidate values and positions (cap <= L), _BIN_CAP of each for
    the threshold's bin."""
    N, C, L = x.shape
    groups = N * C
    sample, run, sample_warps, block, chunk_warps = _split_config(groups, L)
    cap = _candidate_cap(L)
    chunks = cdiv(L, block)
    dev = x.device
    scratch = torch.empty((groups, _SCRATCH), dtype=torch.int32, device=dev)
    hist = torch.empty((groups, _BAND_BINS), dtype=torch.int32, device=dev)
    candidates = torch.empty((groups, cap), dtype=x.dtype, device=dev)
    positions = torch.empty((groups, cap), dtype=torch.int32, device=dev)
    listed = torch.empty((groups, _BIN_CAP), dtype=x.dtype, device=dev)
    listed_positions = torch.empty((groups, _BIN_CAP), dtype=torch.int32, device=dev)
    with on_device(x):
        _kwta_sample_kernel[(groups,)](
            x, scratch, hist, C, L, k, absolute, *x.stride(),
            SAMPLE=sample, RUN=run, NBINS=_BAND_BINS, num_warps=sample_warps)
        _kwta_filter_kernel[(groups * chunks,)](
            x, out, scratch, hist, candidates, positions,
            C, L, chunks, cap, absolute, *x.stride(), *out.stride(),
            BLOCK=block, NBINS=_BAND_BINS, num_warps=chunk_warps)
        _kwta_finish_kernel[(groups,)](
            x, out, threshold, scratch, hist, candidates, positions, listed, listed_positions,
            C, L, k, cap, absolute, *x.stride(), *out.stride(),
            TAIL=_TAIL, NBINS=_BAND_BINS, BIN_CAP=_BIN_CAP, num_warps=_FINISH_WARPS,
            maxnreg=_FINISH_MAX_REGS)


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
    blocks_per_row = cdiv(L, block_l)
    grid = (cdiv(N * C, block_g) * blocks_per_row,)
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
    forward = {(*_forward_config(length, unit), unit, _forward_config(length, unit)[0] == length)
               for i in range(_FWD_MAX_BLOCK.bit_length()) for length in (1 << i, (1 << i) - 1)
               for unit in (True, False) if length >= 1 and _in_registers(length, unit)}
    backward = {_backward_config(1 << i) for i in range(_BWD_TILE.bit_length())}
    # The split path's configs: SAMPLE and chunk blocks are powers of two within bounds.
    split = {_split_config(groups, 1 << i) for i in range(SPLIT_MIN_GROUP.bit_length() - 1, 32)
             for groups in (1, 1 << 20)}
    sample_cfgs = sorted({(sample, run, warps) for sample, run, warps, _, _ in split})
    chunk_cfgs = sorted({(block, warps) for _, _, _, block, warps in split})
    variants = []
    for dtype in _TL_DTYPES.values():
        for sample, run, warps in sample_cfgs:
            constexprs = {"SAMPLE": sample, "RUN": run, "NBINS": _BAND_BINS}
            variants.append((_kwta_sample_kernel, signature(
                _kwta_sample_kernel, dtype, constexprs, {"scratch_ptr": "*i32", "hist_ptr": "*i32"}),
                constexprs, {"num_warps": warps}))
        pointers = {"scratch_ptr": "*i32", "hist_ptr": "*i32", "pos_ptr": "*i32",
                    "list_pos_ptr": "*i32"}
        for block, warps in chunk_cfgs:
            constexprs = {"BLOCK": block, "NBINS": _BAND_BINS}
            variants.append((_kwta_filter_kernel, signature(_kwta_filter_kernel, dtype, constexprs, pointers),
                             constexprs, {"num_warps": warps}))
        constexprs = {"TAIL": _TAIL, "NBINS": _BAND_BINS, "BIN_CAP": _BIN_CAP}
        variants.append((_kwta_finish_kernel, signature(_kwta_finish_kernel, dtype, constexprs, pointers),
                         constexprs, {"num_warps": _FINISH_WARPS, "maxnreg": _FINISH_MAX_REGS}))
        # EVEN (L == BLOCK) with stride-1 groups only: strided ones keep the lane masks.
        for block, num_warps, unit, even in sorted(forward):
            if even and not unit:
                continue
            constexprs = {"BLOCK": block, "UNIT": unit, "EVEN": even}
            variants.append((_kwta_forward_kernel, signature(_kwta_forward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": num_warps}))
        for block_g, block_l in sorted(backward):
            constexprs = {"BLOCK_G": block_g, "BLOCK_L": block_l}
            variants.append((_kwta_backward_kernel, signature(_kwta_backward_kernel, dtype, constexprs),
                             constexprs, {"num_warps": _BWD_NUM_WARPS}))
    return variants


# Ahead-of-time compile list for `python -m pyprune.triton_kernels.aot`.
AOT = _aot_variants()
