// Stochastic activation pruning on CUDA, each sample split across many blocks so that the grid
// fills the GPU at every batch size and no block walks a whole sample. Three launches, no host
// sync (the seed is read from device memory, or passed by value from a host seed tensor: SeedArg;
// CUDA-graph safe), a workspace of (N, K + NB) acc_t from the caching allocator (K element
// chunks, NB draw chunks per sample); two where a sample has at most kBernoulliOwnTotal element
// chunks (bernoulli) or at most kMergeOwnPrefix chunks of each kind (exact): no prefix launch,
// each block of pass 3 makes the sums it needs itself; and in bernoulli mode one on sm_90 where
// it has at most
// kClusterMaxChunks and L % 4 == 0 (3': a thread-block cluster a sample holding it in
// registers, no workspace: x read from DRAM once):
//
//  1. partials, a block per (sample, chunk): an element chunk (kChunk = 2048 consecutive
//     elements, two packs of 4 a thread) sums |x| (exact: the in-chunk sums, bernoulli: the
//     chunk's sum alone, chunk_sums); in exact mode a draw chunk (W Philox groups a
//     thread, 1024 * W draws, aligned to global index multiples of 4 so every Philox output is
//     computed once) sums its Exp(1) spacings and, in stored mode (W == 1, r <= kStoreMaxRatio
//     * L), writes each draw's in-chunk position for pass 3 to read back;
//  2. prefix, a block per sample: the partials become inclusive prefix sums, B (elements) and D
//     (draws), each summed sequentially in a fixed order by one thread, hence deterministic and
//     monotone;
//  3. exact: merge + write, a block per (sample, element chunk k), from the prefix sums (or,
//     without the prefix launch, from the sample's partials staged in shared memory and summed
//     there by two threads in the prefix kernel's order: the same bits); bernoulli: the
//     elementwise pass, one Philox per 4 elements (evaluations side by side: philox_n), q from
//     the stored total (or, without the prefix launch, from the sample's partials summed by
//     thread 0 of the block in the prefix kernel's order), a pack of 4 at a time by
//     bernoulli_pack.
//
// Positions, in the units of C (prefix of |x|): chunk k owns [B_{k-1}, B_k) (the last chunk
// [B_{K-2}, inf)), so the chunks partition the line and every draw lands in exactly one chunk.
// Draw d (< r) of sample n is global value i = n (r + 1) + d, its position
// v = (D_{b-1} + s_d) * total / D_{NB-1}, s_d its in-chunk inclusive sum. Both kinds of chunk
// go through one scan (chunk_scan: a thread's sequential sums, a block sum scan, then a max scan
// that makes the values monotone across threads, NaN kept); the partial of a chunk is the scan's
// last value, so pass 3 regenerates (or, stored, reads back) in-chunk sums bit for bit and the
// values of draw chunk b
// lie in [D_{b-1}, D_b] exactly: the draw chunks a block needs follow from D by two counts (no
// margin for rounding), and a draw chunk wholly inside one element's interval flags it without
// being generated (r far above L costs at most one generated chunk per element boundary). A
// block binary-searches each in-range draw among its chunk's C_j (clamped to the chunk's end,
// the last one forced to it) and flags the element.
//
// A tiny total (sap_tiny_total_scale) and every |x| are scaled by a power of two (exact). A
// sample whose total is zero, NaN or inf keeps nothing. Kept elements are written as src / q
// (src = x forward, grad backward), the rest as src * 0. The chunk sizes depend on (L, r) only,
// so the kept set does not depend on the batch size, and forward and backward (same N, L, r,
// seed) regenerate the same one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../random.h"
#include "../sap.h"
#include "cluster.cuh"

namespace pyprune {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kItems = 4;  // a pack of elements; the draws of one Philox group
constexpr int kPacks = 2;  // packs a thread per element chunk
constexpr int kElems = kItems * kPacks;
constexpr int64_t kChunk = kThreads * kElems;  // elements of a chunk
constexpr int64_t kDrawGroup = kThreads * kItems;  // draws of one Philox group a thread
// Bernoulli pass: Philox groups a thread (16 elements: the item's index work and the block's
// total spread over 4 groups; 8 elements took ~12% more instructions an element).
constexpr int kWriteGroups = 4;
constexpr int64_t kWriteChunk = kDrawGroup * kWriteGroups;
constexpr int64_t kMaxDrawChunks = int64_t{1} << 16;  // per sample (the workspace for huge r)
// The merge tests draw chunks for lying wholly inside one element where r >= this * L.
constexpr int64_t kWholeChunkRatio = 2;
// Exact mode stores each draw's in-chunk position (acc_t, at most this many a sample's element:
// eager's multinomial alone takes 8 bytes a draw) where r <= this * L and W == 1; the merge
// then makes no draw again (each Philox output computed once).
constexpr int64_t kStoreMaxRatio = 4;
// Bernoulli samples of at most this many element chunks (L <= 131072) skip the prefix launch:
// thread 0 of each bernoulli block adds the sample's partials itself, in the prefix kernel's
// order (the same total bit for bit), a few hundred cycles where a launch costs microseconds.
constexpr int64_t kBernoulliOwnTotal = 64;
// Exact samples of at most this many element chunks and at most this many draw chunks (L and r
// up to 262144 where r <= L) skip the prefix launch: each merge block stages its sample's K + NB
// partials in shared memory and threads 0 and 32 sum them there as the prefix kernel does (two
// chains of at most 256 dependent additions, overlapping the block's loads of x), where a launch
// costs microseconds of host and device time.
constexpr int64_t kMergeOwnPrefix = kThreads;
// Bernoulli samples of L % 4 == 0 run in one launch on sm_90 (sap_bernoulli_cluster_kernel): a
// cluster of at most kClusterMaxBlocks blocks a sample (above the portable 8 where the GPU
// schedules them: max_cluster_size), each holding up to kClusterMaxChunksPerBlock element
// chunks, so samples of up to 64 chunks (L <= 131072; 32 with clusters of 8).
constexpr int kClusterMaxBlocks = 16;
constexpr int kClusterMaxChunksPerBlock = 4;
constexpr int kClusterMaxChunks = kClusterMaxBlocks * kClusterMaxChunksPerBlock;

// Register budgets as blocks of 256 per SM (>= 2: 25% occupancy).
template <typename scalar_t>
constexpr int stream_min_blocks() {
  return sizeof(scalar_t) == 8 ? 2 : 4;
}
// The bernoulli pass holds kWriteGroups * 4 elements a thread and their sources: 64 registers
// spill (float on sm_80, the 16-bit types on sm_90); 3 blocks (85) do not.
template <typename scalar_t>
constexpr int bernoulli_min_blocks() {
  return sizeof(scalar_t) == 8 ? 2 : 3;
}
// The one-launch bernoulli kernel holds G * 8 elements a thread (the source is loaded late).
template <typename scalar_t, int G>
constexpr int cluster_min_blocks() {
  return sizeof(scalar_t) == 8 || G > 2 ? 2 : 3;
}
// The merge holds 8 elements, their sources and bounds a thread through the draw loop.
template <typename scalar_t>
constexpr int merge_min_blocks() {
  return sizeof(scalar_t) == 8 ? 2 : 3;
}

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kItems) Pack {
  scalar_t v[kItems];
};

template <typename scalar_t>
struct SapParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ src;
  scalar_t* __restrict__ out;
  SeedArg seed;
  acc_t* __restrict__ ws;  // (N, K + NB): the partials, then their inclusive prefix sums
  // Stored mode (exact, W == 1, r <= kStoreMaxRatio * L): (N, NB * kDrawGroup), each draw's
  // in-chunk position (the monotone inclusive sum the merge would compute), written by the
  // partials pass, read back by the merge instead of making the draws again.
  acc_t* __restrict__ draws;
  int64_t N, L, r;
  int64_t xs0, xs1, ss0, ss1, os0, os1;
  int64_t K;   // element chunks per sample
  int64_t NB;  // draw chunks per sample (exact), 0 (bernoulli)
  int64_t W;   // Philox groups a thread per draw chunk: a draw chunk holds kDrawGroup * W draws
  int64_t KW;  // bernoulli pass: chunks per sample
  bool vec_x;    // x's rows in 4-element packs (partials, exact merge)
  bool vec_out;  // x, src, out in packs for pass 3 (exact: rows; bernoulli: global index)
  bool same;     // src is x (forward)
  bool own_total;  // bernoulli: ws holds the partials, each block sums its sample's (no prefix)
  bool own_prefix;  // exact: ws holds the partials, each merge block makes the prefix sums
  bool stored;     // exact: the draws' positions are in `draws`
};

template <typename scalar_t>
__device__ inline Seed load_seed(const SapParams<scalar_t>& p) {
  return p.seed.load();
}

// The pack at p (aligned), as acc_t.
template <typename scalar_t, typename acc_t>
__device__ inline void load_pack(const scalar_t* p, acc_t* v) {
  const Pack<scalar_t> pk = *reinterpret_cast<const Pack<scalar_t>*>(p);
#pragma unroll
  for (int i = 0; i < kItems; ++i) v[i] = static_cast<acc_t>(pk.v[i]);
}

// Elements j0 .. j0 + 3 of a row (0 outside [0, L)); a pack where all four are inside.
template <typename scalar_t, typename acc_t>
__device__ inline void load4(const scalar_t* row, int64_t stride, int64_t j0, int64_t L, bool vec,
                             acc_t (&v)[kItems]) {
  if (vec && j0 >= 0 && j0 + kItems <= L) {
    load_pack(row + j0, v);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = j0 + i;
      v[i] = j >= 0 && j < L ? static_cast<acc_t>(row[j * stride]) : acc_t(0);
    }
  }
}

// A pack goes out through st.global.v4 (16 bytes at a time): a plain struct assignment may be
// split into scalar stores.
template <typename scalar_t>
__device__ inline void store_pack(scalar_t* p, const Pack<scalar_t>& o) {
  if constexpr (sizeof(Pack<scalar_t>) % 16 == 0) {
#pragma unroll
    for (int h = 0; h < static_cast<int>(sizeof(Pack<scalar_t>) / 16); ++h) {
      unsigned w[4];
      memcpy(w, reinterpret_cast<const char*>(&o) + 16 * h, sizeof(w));
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(
                       reinterpret_cast<char*>(p) + 16 * h),
                   "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                   : "memory");
    }
  } else {
    *reinterpret_cast<Pack<scalar_t>*>(p) = o;
  }
}

// Four acc_t values as the pack at p (aligned).
template <typename scalar_t, typename acc_t>
__device__ inline void store_values(scalar_t* p, const acc_t* v) {
  Pack<scalar_t> pk;
#pragma unroll
  for (int i = 0; i < kItems; ++i) pk.v[i] = static_cast<scalar_t>(v[i]);
  store_pack(p, pk);
}

template <typename scalar_t, typename acc_t>
__device__ inline void store4(scalar_t* row, int64_t stride, int64_t j0, int64_t L, bool vec,
                              const acc_t (&v)[kItems]) {
  if (vec && j0 >= 0 && j0 + kItems <= L) {
    store_values(row + j0, v);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = j0 + i;
      if (j >= 0 && j < L) row[j * stride] = static_cast<scalar_t>(v[i]);
    }
  }
}

// |v| as the sign bit cleared (a source modifier of the instruction that uses it, not a
// compare and a select): NaN stays NaN, and -0 becomes +0, which sums and compares as -0 does.
template <typename acc_t>
__device__ inline acc_t abs_of(acc_t v) {
  return ::fabs(v);
}

// max that keeps a NaN of either side (a NaN partial must reach the total).
struct NanMax {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return (a != a || a > b) ? a : b;
  }
};

template <typename acc_t>
using BlockScan = cub::BlockScan<acc_t, kThreads>;

// The in-chunk inclusive sums: a thread's values are its sequential sums prefix + l (l: its own
// running sum), raised to floor (the largest last value of the threads before it), so they are
// monotone across the chunk; chunk is the chunk's last value. The same code in every pass gives
// the same bits.
template <typename acc_t>
__device__ inline void chunk_scan(acc_t local, typename BlockScan<acc_t>::TempStorage& tmp,
                                  acc_t& prefix, acc_t& floor, acc_t& chunk) {
  BlockScan<acc_t>(tmp).ExclusiveSum(local, prefix);
  __syncthreads();
  BlockScan<acc_t>(tmp).ExclusiveScan(prefix + local, floor, acc_t(0), NanMax(), chunk);
  __syncthreads();
}

// A thread's sum of |v| over its elements of a chunk, in order.
template <typename acc_t>
__device__ inline acc_t abs_sum(const acc_t (&v)[kElems]) {
  acc_t l = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) l += abs_of(v[i]);
  return l;
}

constexpr int kWarps = kThreads / 32;

// Bernoulli partials: the sums of G chunks at once, local[s] a thread's abs_sum of its elements
// of chunk s. A warp's sums by an xor butterfly (every lane adds the same two values: one result
// in all of them), then chunk s's eight warp sums in order by thread s, into partial[s]
// (shared; read by other threads after a barrier). Exact mode needs the in-chunk sums
// (chunk_scan), bernoulli only the total: two barriers and ~15 instructions a chunk a thread
// instead of the scan's ~100. Every kernel that makes a bernoulli partial calls this (one order:
// the same bits in one launch and in two).
template <typename acc_t, int G>
__device__ inline void chunk_sums(acc_t (&local)[G], acc_t (&warp_sums)[G][kWarps],
                                  acc_t (&partial)[G]) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
#pragma unroll
    for (int s = 0; s < G; ++s) local[s] += __shfl_xor_sync(0xffffffffu, local[s], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < G; ++s) warp_sums[s][warp] = local[s];
  }
  __syncthreads();
  if (tid < G) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[tid][w];
    partial[tid] = sum;
  }
}

// A thread's kElems elements j0 .. j0 + kElems - 1, pack by pack.
template <typename scalar_t, typename acc_t>
__device__ inline void load_elems(const scalar_t* row, int64_t stride, int64_t j0, int64_t L,
                                  bool vec, acc_t (&v)[kElems]) {
#pragma unroll
  for (int h = 0; h < kPacks; ++h) {
    acc_t pk[kItems];
    load4(row, stride, j0 + h * kItems, L, vec, pk);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[h * kItems + i] = pk[i];
  }
}

template <typename scalar_t, typename acc_t>
__device__ inline void store_elems(scalar_t* row, int64_t stride, int64_t j0, int64_t L, bool vec,
                                   const acc_t (&v)[kElems]) {
#pragma unroll
  for (int h = 0; h < kPacks; ++h) {
    acc_t pk[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) pk[i] = v[h * kItems + i];
    store4(row, stride, j0 + h * kItems, L, vec, pk);
  }
}

// A thread's kElems elements from row[0] on, in packs (aligned, inside the row).
template <typename scalar_t, typename acc_t>
__device__ inline void load_packs(const scalar_t* row, acc_t (&v)[kElems]) {
#pragma unroll
  for (int h = 0; h < kPacks; ++h) load_pack(row + h * kItems, v + h * kItems);
}

template <typename scalar_t, typename acc_t>
__device__ inline void store_packs(scalar_t* row, const acc_t (&v)[kElems]) {
#pragma unroll
  for (int h = 0; h < kPacks; ++h) store_values(row + h * kItems, v + h * kItems);
}

template <typename acc_t>
__device__ inline acc_t element_local(const acc_t (&a)[kElems], acc_t (&c)[kElems]) {
  acc_t l = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) {
    l += a[i];
    c[i] = l;
  }
  return l;
}

// Exp(1) from a Philox word, -log(1 - u) (u: to_uniform) through the hardware log2 (absolute
// error below 2^-21, against ~20 instructions for logf; the CPU's spacings use their own fast
// log too), never negative: the in-chunk sums must not decrease.
__device__ inline float spacing_of(uint32_t bits) {
  const float e = -__logf(1.0f - to_uniform(bits));
  return e > 0.0f ? e : 0.0f;
}

// The spacings of one Philox group: e[i] for global value 4 * counter + i, 0 outside the
// sample's r + 1 values [base, base + r].
template <typename acc_t>
__device__ inline void spacings(const Seed& seed, uint64_t counter, uint64_t base, uint64_t r,
                                acc_t (&e)[kItems]) {
  const Philox4 w = philox(seed.key, counter, seed.stream);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    // g - base <= r unsigned: a value below base wraps above r.
    const uint64_t g = 4 * counter + i;
    e[i] = g - base <= r ? static_cast<acc_t>(spacing_of(w.w[i])) : acc_t(0);
  }
}

// Thread's groups of a draw chunk: counters c0 .. c0 + W - 1. Returns their sequential sum;
// e0: the first group's spacings.
template <typename acc_t>
__device__ inline acc_t draw_local(const Seed& seed, uint64_t c0, int64_t W, uint64_t base,
                                   uint64_t r, acc_t (&e0)[kItems]) {
  acc_t local = 0;
  for (int64_t w = 0; w < W; ++w) {
    acc_t e[kItems];
    spacings(seed, c0 + w, base, r, e);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      local += e[i];
      if (w == 0) e0[i] = e[i];
    }
  }
  return local;
}

// A thread's in-chunk positions of its first Philox group's four draws: its running sum l of
// the spacings e0, raised by the chunk scan's prefix and floor (monotone across the chunk);
// what the merge places, whether it made them itself or reads them back. Returns l (the
// running sum goes on into the thread's further groups where W > 1).
template <typename acc_t>
__device__ inline acc_t group_positions(const acc_t (&e0)[kItems], acc_t prefix, acc_t floor,
                                        acc_t (&pos)[kItems]) {
  acc_t l = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    l += e0[i];
    pos[i] = NanMax()(prefix + l, floor);
  }
  return l;
}

// The layout of a sample's draws: value i of the call is n (r + 1) + d; chunk b covers the
// global values [g0 + b D, g0 + (b + 1) D), g0 = base rounded down to a multiple of 4.
struct Draws {
  uint64_t base, r, g0, per_chunk;
  int64_t W;
  __device__ Draws(int64_t n, int64_t r_, int64_t W_)
      : base(static_cast<uint64_t>(n) * static_cast<uint64_t>(r_ + 1)),
        r(static_cast<uint64_t>(r_)),
        g0(base & ~uint64_t{3}),
        per_chunk(static_cast<uint64_t>(kDrawGroup * W_)),
        W(W_) {}
  // This thread's first Philox counter in chunk b.
  __device__ uint64_t counter(int64_t b) const {
    return (g0 + static_cast<uint64_t>(b) * per_chunk) / 4 +
           static_cast<uint64_t>(threadIdx.x) * static_cast<uint64_t>(W);
  }
  // Whether chunk b holds a draw (d < r; the last value d = r only ends the spacings).
  __device__ bool has_draws(int64_t b) const {
    const uint64_t gs = g0 + static_cast<uint64_t>(b) * per_chunk;
    const uint64_t lo = gs > base ? gs : base;
    const uint64_t end = base + r, hi = gs + per_chunk < end ? gs + per_chunk : end;
    return hi > lo;
  }
};

// The hardware approximations (MUFU) alone, flushing denormals: 2^v and 1 / v. __expf and
// __fdividef wrap the same instructions in range checks (~6 instructions an element) that
// change nothing where they are used here: 2^v below 2^-126 only ever meets 1 - 2^v, which is
// 1 either way, and the divisor q is a normal number <= 1.
__device__ inline float exp2_approx(float v) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(v));
  return e;
}

__device__ inline float rcp_approx(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// q = -expm1(r log1p(-p)): float from log and exp with the corrections that keep relative
// accuracy near 0 (log1p(-p) by its series below p = 2^-7, truncation p^5 / 5 under float
// rounding, else log(1 - p) with Goldberg's correction; expm1(y) by the degree-5 minimax
// polynomial of csrc/sap.h on [-1/2, 0], else 1 - exp(y), where q >= 0.39 absorbs the hardware exp2's
// rounding: a few ulp); the arithmetic of csrc/cpu/fast_math.h's fast_keep_probability. double
// through libm. The series and the expm1 are their own functions so that the elementwise
// passes' fast path (bernoulli_pack) computes q with the same instructions.
constexpr float kSeriesMaxP = 0.0078125f;  // 2^-7

__device__ inline float log1p_neg_series(float p) {
  return -p * (1.0f + p * (0.5f + p * (1.0f / 3 + p * 0.25f)));
}

// -expm1(y) for y <= 0: both branches evaluated and one selected (no branch).
__device__ inline float neg_expm1(float y) {
  float e = kExpm1C5;
  e = kExpm1C4 + y * e;
  e = kExpm1C3 + y * e;
  e = kExpm1C2 + y * e;
  e = kExpm1C1 + y * e;
  e = 1.0f + y * e;
  return y < -0.5f ? 1.0f - exp2_approx(y * 1.44269504f) : -y * e;  // e^y as __expf computes it
}

__device__ inline float keep_probability(float p, float r) {
  float log1p_neg;
  if (p < kSeriesMaxP) {
    log1p_neg = log1p_neg_series(p);
  } else {
    const float u = 1.0f - p;
    log1p_neg = logf(u) * (-p / (u - 1.0f));
  }
  return neg_expm1(r * log1p_neg);
}

__device__ inline double keep_probability(double p, double r) {
  return -expm1(r * log1p(-p));
}

// src / q of a kept element: float through the hardware reciprocal (2 ulp) where q is normal
// (__fdividef's result there).
__device__ inline float divide(float g, float q) {
  return q >= 1.17549435e-38f ? g * rcp_approx(q) : g / q;
}

__device__ inline double divide(double g, double q) {
  return g / q;
}

// The sample's total: pre (the tiny-total power of two), total * pre, and whether it draws.
template <typename acc_t>
struct Total {
  acc_t pre, total, inv;  // inv = 1 / total: p = |x| * pre * inv
  bool drawable;
  bool plain;  // drawable with pre = 1: p = |x| * inv, the same bits
  __device__ explicit Total(acc_t raw) {
    pre = static_cast<acc_t>(sap_tiny_total_scale<acc_t>(raw));
    total = raw * pre;
    inv = acc_t(1) / total;
    // Nothing is drawn from an all-zero sample or one with a NaN or inf (p undefined), nor from
    // one whose sum overflows (the reference's p = |x| / inf = 0).
    drawable = total > acc_t(0) && total < static_cast<acc_t>(INFINITY);
    plain = drawable && pre == acc_t(1);
  }
};

// Outputs of n elements (a: x, src: x forward, grad backward): src / q where kept(i, q) (q:
// element i's keep probability), else src * 0. A sample that draws nothing writes src * 0.
// float, in a sample of no tiny total (Total::plain): a fast path for the elements of a
// realistic sample (p below 2^-7: q from the series, no branch; src / q through the
// reciprocal), the n elements done again in general form only where one of them needs the
// general log1p or a divisor below FLT_MIN (p >= 2^-7, or a kept element of q < 2^-126: a rare
// branch, n elements at a time, where a branch an element cost its divergence bookkeeping).
// Both paths give the same bits: p is |x| * inv either way (pre = 1), and the series is
// keep_probability's branch below 2^-7.
template <int n, typename acc_t, typename Kept>
__device__ inline void sap_outputs(const acc_t* a, const acc_t* src, const Total<acc_t>& tot,
                                   acc_t r, const Kept& kept, acc_t* o) {
  if (!tot.drawable) {  // (block-uniform)
#pragma unroll
    for (int i = 0; i < n; ++i) o[i] = src[i] * acc_t(0);
    return;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (tot.plain) {  // (block-uniform)
      bool slow = false;  // bitwise: || would branch (or reset predicates) an element
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const float pi = abs_of(a[i]) * tot.inv;
        const float q = neg_expm1(r * log1p_neg_series(pi));
        const bool k = kept(i, q);
        slow |= !(pi < kSeriesMaxP) | (k & !(q >= 1.17549435e-38f));
        o[i] = k ? src[i] * rcp_approx(q) : src[i] * 0.0f;
      }
      if (!slow) return;
    }
  }
#pragma unroll
  for (int i = 0; i < n; ++i) {
    const acc_t q = keep_probability(abs_of(a[i]) * tot.pre * tot.inv, r);
    o[i] = kept(i, q) ? divide(src[i], q) : src[i] * acc_t(0);
  }
}

// Bernoulli outputs of one pack (the four words of one Philox evaluation): an element is kept
// where its uniform (a Philox word) is below q.
template <typename acc_t>
__device__ inline void bernoulli_pack(const Philox4& w, const acc_t* a, const acc_t* src,
                                      const Total<acc_t>& tot, acc_t r, acc_t* o) {
  sap_outputs<kItems>(
      a, src, tot, r,
      [&](int i, acc_t q) { return static_cast<acc_t>(to_uniform(w.w[i])) < q; }, o);
}

// 1. Partials: item (n, c), c < K an element chunk, else draw chunk c - K.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<scalar_t>())
    sap_partials_kernel(const SapParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename BlockScan<acc_t>::TempStorage tmp;
  __shared__ acc_t warp_sums[1][kWarps];
  const Seed seed = load_seed(p);
  const int64_t per = p.K + p.NB;
  const uint64_t items = static_cast<uint64_t>(p.N) * static_cast<uint64_t>(per);
  for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = static_cast<int64_t>(item / static_cast<uint64_t>(per));
    const int64_t c = static_cast<int64_t>(item - static_cast<uint64_t>(n) * per);
    acc_t local;
    acc_t e0[kItems];
    if (c < p.K) {
      acc_t a[kElems];
      load_elems(p.x + n * p.xs0, p.xs1, c * kChunk + threadIdx.x * kElems, p.L, p.vec_x, a);
      local = abs_sum(a);
      if (p.NB == 0) {  // bernoulli (block-uniform): the chunk's sum, no in-chunk sums
        acc_t l[1] = {local}, partial[1];
        chunk_sums<acc_t, 1>(l, warp_sums, partial);
        if (threadIdx.x == 0) p.ws[n * per + c] = partial[0];
        __syncthreads();  // warp_sums is rewritten by the next item
        continue;
      }
    } else {
      const Draws draws(n, p.r, p.W);
      local = draw_local(seed, draws.counter(c - p.K), p.W, draws.base, draws.r, e0);
    }
    acc_t prefix, floor, chunk;
    chunk_scan(local, tmp, prefix, floor, chunk);
    if (threadIdx.x == 0) p.ws[n * per + c] = chunk;
    if (p.stored && c >= p.K) {  // (W == 1: the thread's one group)
      acc_t pos[kItems];
      group_positions(e0, prefix, floor, pos);
      Pack<acc_t> pk;
#pragma unroll
      for (int i = 0; i < kItems; ++i) pk.v[i] = pos[i];
      *reinterpret_cast<Pack<acc_t>*>(
          p.draws + ((n * p.NB + (c - p.K)) * kDrawGroup + threadIdx.x * kItems)) = pk;
    }
  }
}

// 2. Prefix: per sample, B (K element partials) and D (NB draw partials) become inclusive prefix
// sums, each by one thread in order (threads 0 and 32 run the two chains side by side).
//
// One chain: t[0 .. count) become their inclusive running sums from carry, in order (8 loads in
// flight, then the 8 dependent adds); returns the last. The prefix sums' one order: the prefix
// kernel and the merge blocks that make their own give the same bits.
template <typename acc_t>
__device__ inline acc_t prefix_chain(acc_t* t, int64_t count, acc_t carry) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    acc_t v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = t[i + u];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      carry += v[u];
      t[i + u] = carry;
    }
  }
  for (; i < count; ++i) {
    carry += t[i];
    t[i] = carry;
  }
  return carry;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sap_prefix_kernel(acc_t* __restrict__ ws, int64_t N, int64_t K, int64_t NB) {
  __shared__ acc_t tile[2][kThreads];
  const int tid = threadIdx.x;
  const int64_t per = K + NB, steps = std::max(K, NB);
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    acc_t* wsn = ws + n * per;
    acc_t carry = 0;  // thread 0: elements, thread 32: draws
    for (int64_t t0 = 0; t0 < steps; t0 += kThreads) {
      const int64_t e = t0 + tid;
      if (e < K) tile[0][tid] = wsn[e];
      if (e < NB) tile[1][tid] = wsn[K + e];
      __syncthreads();
      if (tid == 0 || tid == 32) {
        const int s = tid == 0 ? 0 : 1;
        carry = prefix_chain(tile[s], std::min<int64_t>(kThreads, (s == 0 ? K : NB) - t0), carry);
      }
      __syncthreads();
      if (e < K) wsn[e] = tile[0][tid];
      if (e < NB) wsn[K + e] = tile[1][tid];
    }
  }
}

// The element of a chunk whose bound first exceeds v: the number of bounds <= v, by a search of
// fixed depth over all kChunk slots. Every slot is written, and the bounds never decrease: those
// from the chunk's last element on hold its end, above every v searched, so the answer lies
// below the element count. Branchless: a shared load, a compare and a predicated add a step
// (the bounded search took ~9 a step behind its branches).
template <typename acc_t>
__device__ inline int find_element(const acc_t* cs, acc_t v) {
  int at = 0;
#pragma unroll
  for (int half = kChunk / 2; half > 0; half /= 2) at += cs[at + half - 1] <= v ? half : 0;
  return at;
}

// How many draw chunks b end below lo and below hi (D_b * scale < lim; monotone in b), by
// block-wide counts: groups of s = ceil(NB / 256) chunks (whole groups below, by their last
// chunk), then the chunks of the first group that is not. Every thread gets both counts.
template <typename acc_t>
__device__ inline void count_below(const acc_t* dend, int64_t NB, acc_t scale, acc_t lo, acc_t hi,
                                   int64_t& below_lo, int64_t& below_hi) {
  const int64_t t = threadIdx.x;
  const int64_t s = (NB + kThreads - 1) / kThreads;
  int64_t g_lo = 0, g_hi = 0;
  if (s > 1) {
    const bool live = t * s < NB;
    const acc_t v = live ? dend[std::min((t + 1) * s, NB) - 1] * scale : acc_t(0);
    g_lo = static_cast<int64_t>(__syncthreads_count(live && v < lo)) * s;
    g_hi = static_cast<int64_t>(__syncthreads_count(live && v < hi)) * s;
  }
  const int64_t span = s > 1 ? s : kThreads;
  const int64_t b_lo = g_lo + t, b_hi = g_hi + t;
  const bool in_lo = t < span && b_lo < NB, in_hi = t < span && b_hi < NB;
  const acc_t v_lo = in_lo ? dend[b_lo] * scale : acc_t(0);
  const acc_t v_hi = in_hi ? dend[b_hi] * scale : acc_t(0);
  below_lo = std::min(NB, g_lo + __syncthreads_count(in_lo && v_lo < lo));
  below_hi = std::min(NB, g_hi + __syncthreads_count(in_hi && v_hi < hi));
}

// 3. Exact: item (n, k): the chunk's elements, their bounds C_j in shared memory, the draws that
// land in [lo, hi), then the write.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, merge_min_blocks<scalar_t>())
    sap_merge_kernel(const SapParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename BlockScan<acc_t>::TempStorage tmp;
  // A thread's bounds and flags are written as packs (16-byte and 8-byte stores; 8 scalar
  // stores at a 32-byte lane stride would meet 8-way bank conflicts) and its flags read as one.
  static_assert(kElems == 8, "a thread's flags are one 8-byte word");
  __shared__ alignas(alignof(Pack<acc_t>)) acc_t cs[kChunk];
  __shared__ alignas(8) unsigned char hit[kChunk];
  __shared__ acc_t d_start[kThreads], d_end[kThreads];
  __shared__ acc_t own[2][kMergeOwnPrefix];  // own prefix: B (elements) and D (draws)
  const int tid = threadIdx.x;
  const Seed seed = load_seed(p);
  const int64_t per = p.K + p.NB;
  const uint64_t items = static_cast<uint64_t>(p.N) * static_cast<uint64_t>(p.K);
  const acc_t inf = static_cast<acc_t>(INFINITY);
  for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = static_cast<int64_t>(item / static_cast<uint64_t>(p.K));
    const int64_t k = static_cast<int64_t>(item - static_cast<uint64_t>(n) * p.K);
    const acc_t* wsn = p.ws + n * per;
    const acc_t* bsum = wsn;  // B_0 .. B_{K-1}
    const acc_t* dsum = wsn + p.K;  // D_0 .. D_{NB-1}
    const int64_t j0 = k * kChunk + tid * kElems;
    // Every load first.
    acc_t a[kElems], g[kElems];
    load_elems(p.x + n * p.xs0, p.xs1, j0, p.L, p.vec_out, a);
    if (p.same) {
#pragma unroll
      for (int i = 0; i < kElems; ++i) g[i] = a[i];
    } else {
      load_elems(p.src + n * p.ss0, p.ss1, j0, p.L, p.vec_out, g);
    }
    if (p.own_prefix) {  // block-uniform (own is rewritten after the item's last barrier)
      if (tid < p.K) own[0][tid] = wsn[tid];
      if (tid < p.NB) own[1][tid] = wsn[p.K + tid];
      __syncthreads();
      if (tid == 0) prefix_chain(own[0], p.K, acc_t(0));
      if (tid == 32) prefix_chain(own[1], p.NB, acc_t(0));
      __syncthreads();
      bsum = own[0];
      dsum = own[1];
    }
    const acc_t start = k > 0 ? bsum[k - 1] : acc_t(0), end = bsum[k];
    const Total<acc_t> tot(bsum[p.K - 1]);
    const acc_t dlast = dsum[p.NB - 1];

#pragma unroll
    for (int i = 0; i < kElems; ++i) a[i] = abs_of(a[i]);
    acc_t c[kElems];
    const acc_t local = element_local(a, c);
    acc_t prefix, floor, chunk;
    chunk_scan(local, tmp, prefix, floor, chunk);
    const int64_t rest = p.L - k * kChunk;
    const int count = static_cast<int>(rest < kChunk ? rest : kChunk);
    const acc_t lo = start * tot.pre, hi = k == p.K - 1 ? inf : end * tot.pre;
#pragma unroll
    for (int h = 0; h < kPacks; ++h) {
      Pack<acc_t> pk;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = tid * kElems + h * kItems + i;
        const acc_t bound = NanMax()(prefix + c[h * kItems + i], floor);
        const acc_t cj = (start + bound) * tot.pre;
        pk.v[i] = j >= count - 1 ? hi : (cj < hi ? cj : hi);
      }
      reinterpret_cast<Pack<acc_t>*>(cs + tid * kElems)[h] = pk;
    }
    reinterpret_cast<uint2*>(hit)[tid] = make_uint2(0u, 0u);
    __syncthreads();

    if (tot.drawable && lo < hi) {  // the same for every thread
      const acc_t scale = tot.total / dlast;
      const acc_t* dend = dsum;
      int64_t b0, b1;
      count_below(dend, p.NB, scale, lo, hi, b0, b1);
      const int64_t b_end = std::min(p.NB, b1 + 1);
      const Draws draws(n, p.r, p.W);
      // A draw chunk wholly inside one element (flagged without generating it) takes an
      // element of at least kDrawGroup * W / r of the mass: tested only where draws outnumber
      // elements kWholeChunkRatio times (the test, a search of the bounds by every thread,
      // costs a chunk ~15% of its work where it fails; the result is the same either way).
      const bool whole_chunks = p.r >= kWholeChunkRatio * p.L;
      for (int64_t w0 = b0; w0 < b_end; w0 += kThreads) {
        const int64_t span = std::min<int64_t>(kThreads, b_end - w0);
        __syncthreads();  // the previous window is read
        if (tid < span) {
          d_end[tid] = dend[w0 + tid];
          d_start[tid] = w0 + tid > 0 ? dend[w0 + tid - 1] : acc_t(0);
        }
        __syncthreads();
        for (int m = 0; m < span; ++m) {
          const int64_t b = w0 + m;
          if (!draws.has_draws(b)) continue;
          const acc_t ds = d_start[m];
          const acc_t vs = ds * scale, ve = d_end[m] * scale;
          if (whole_chunks && vs >= lo && ve < hi) {
            // Every draw of chunk b lands in element `first` when its bound passes ve too (the
            // bounds before it are <= vs): one search, not one for each end.
            const int first = find_element(cs, vs);
            if (cs[first] > ve) {
              if (tid == 0) hit[first] = 1;
              continue;
            }
          }
          const uint64_t c0 = draws.counter(b);
          // A thread's draws ascend: each search starts at the previous draw's element, which
          // the next draw usually hits again or passes by one.
          // (Where cs[at] <= v, at is below the last element, whose bound exceeds every v.)
          int at = -1;
          const auto place = [&](uint64_t gi, acc_t in_chunk) {
            // A draw of the sample (gi - base < r unsigned: a value below base wraps above r).
            if (gi - draws.base < draws.r) {
              const acc_t v = (ds + in_chunk) * scale;
              if (v >= lo && v < hi) {
                if (at < 0 || !(cs[at] > v)) {
                  at = at >= 0 && cs[at + 1] > v ? at + 1 : find_element(cs, v);
                }
                hit[at] = 1;
              }
            }
          };
          if (p.stored) {  // the partials pass's positions (W == 1): no draw made again
            const Pack<acc_t> pk = *reinterpret_cast<const Pack<acc_t>*>(
                p.draws + ((n * p.NB + b) * kDrawGroup + tid * kItems));
#pragma unroll
            for (int i = 0; i < kItems; ++i) place(4 * c0 + i, pk.v[i]);
            continue;
          }
          acc_t e0[kItems];
          const acc_t dl = draw_local(seed, c0, p.W, draws.base, draws.r, e0);
          acc_t dprefix, dfloor, dchunk;
          chunk_scan(dl, tmp, dprefix, dfloor, dchunk);
          acc_t pos[kItems];
          acc_t l = group_positions(e0, dprefix, dfloor, pos);
#pragma unroll
          for (int i = 0; i < kItems; ++i) place(4 * c0 + i, pos[i]);
          for (int64_t w = 1; w < p.W; ++w) {
            acc_t e[kItems];
            spacings(seed, c0 + w, draws.base, draws.r, e);
#pragma unroll
            for (int i = 0; i < kItems; ++i) {
              l += e[i];
              place(4 * (c0 + w) + i, NanMax()(dprefix + l, dfloor));
            }
          }
        }
      }
    }
    __syncthreads();

    acc_t o[kElems];
    const uint2 flags = reinterpret_cast<const uint2*>(hit)[tid];
    // A zero |x| can only be reached through rounding at a chunk's end: never keep it.
    sap_outputs<kElems>(
        a, g, tot, static_cast<acc_t>(p.r),
        [&](int i, acc_t q) {
          return (((i < kItems ? flags.x : flags.y) >> (8 * (i % kItems))) & 0xffu) != 0u &&
                 q > acc_t(0);
        },
        o);
    store_elems(p.out + n * p.os0, p.os1, j0, p.L, p.vec_out, o);
    __syncthreads();  // cs and hit are rewritten by the next item
  }
}

// 3. Bernoulli: item (n, k); thread t takes the Philox groups (global value 4 * counter) of
// chunk k that meet sample n: element j = 4 * counter + i - n L is kept when u < q.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, bernoulli_min_blocks<scalar_t>())
    sap_bernoulli_kernel(const SapParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared_total;
  const int tid = threadIdx.x;
  const Seed seed = load_seed(p);
  const uint64_t items = static_cast<uint64_t>(p.N) * static_cast<uint64_t>(p.KW);
  for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = static_cast<int64_t>(item / static_cast<uint64_t>(p.KW));
    const int64_t k = static_cast<int64_t>(item - static_cast<uint64_t>(n) * p.KW);
    const uint64_t begin = static_cast<uint64_t>(n) * static_cast<uint64_t>(p.L);
    const uint64_t first = ((begin & ~uint64_t{3}) + static_cast<uint64_t>(k * kWriteChunk)) / 4;
    const scalar_t* x = p.x + n * p.xs0;
    const scalar_t* src = p.src + n * p.ss0;
    scalar_t* out = p.out + n * p.os0;
    acc_t a[kWriteGroups][kItems], g[kWriteGroups][kItems];
    int64_t j0[kWriteGroups];
#pragma unroll
    for (int u = 0; u < kWriteGroups; ++u) {
      const uint64_t counter = first + u * kThreads + tid;
      j0[u] = static_cast<int64_t>(4 * counter - begin);
      load4(x, p.xs1, j0[u], p.L, p.vec_out, a[u]);
      if (p.same) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) g[u][i] = a[u][i];
      } else {
        load4(src, p.ss1, j0[u], p.L, p.vec_out, g[u]);
      }
    }
    acc_t raw_total;
    if (p.own_total) {  // block-uniform: every thread takes both barriers
      if (tid == 0) {
        const acc_t* wsn = p.ws + n * p.K;
        acc_t carry = 0;
        for (int64_t c = 0; c < p.K; ++c) carry += wsn[c];  // sap_prefix_kernel's order
        shared_total = carry;
      }
      __syncthreads();
      raw_total = shared_total;
      __syncthreads();  // read by all before the next item's thread 0 rewrites it
    } else {
      raw_total = p.ws[n * p.K + p.K - 1];
    }
    const Total<acc_t> tot(raw_total);
    const acc_t r = static_cast<acc_t>(p.r);
    // One Philox evaluation at a time: two side by side spill the 16-bit types on sm_80 at
    // this kernel's 85 registers (this is the whole bernoulli path there).
#pragma unroll
    for (int u = 0; u < kWriteGroups; ++u) {
      if (j0[u] >= p.L) continue;
      const Philox4 w = philox(seed.key, first + u * kThreads + tid, seed.stream);
      acc_t o[kItems];
      bernoulli_pack(w, a[u], g[u], tot, r, o);
      store4(out, p.os1, j0[u], p.L, p.vec_out, o);
    }
  }
}

// 3'. Bernoulli in one launch (sm_90): a thread-block cluster of C blocks a sample, block b
// holding the sample's element chunks b G .. b G + G - 1 in registers (thread t the elements
// t kElems .. t kElems + 7 of each, as in the partials kernel), for samples of at most
// G C <= kClusterMaxChunks chunks with L % 4 == 0. Each block sums its chunks (chunk_sums: the
// partials kernel's bits), the blocks read the sample's partials from each other through
// distributed shared memory and thread 0 of each adds them in the prefix kernel's order (the
// same total bit for bit), and the block writes its chunks from registers: x read once from
// DRAM, one launch, and the two-launch path's output (with L % 4 == 0 the packs of a thread are
// Philox groups of the global values n L + j). G > 1 spreads a thread's fixed work (indices,
// the sums, the total) over more elements where the batch leaves enough blocks (the host's
// choice: cluster_plan).
template <typename scalar_t, int G>
__global__ void __launch_bounds__(kThreads, cluster_min_blocks<scalar_t, G>())
    sap_bernoulli_cluster_kernel(const SapParams<scalar_t> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_sums[G][kWarps];
  __shared__ acc_t partial[G];                     // this block's chunks, read by its siblings
  __shared__ acc_t partials[kClusterMaxChunks];    // the sample's, gathered in chunk order
  __shared__ acc_t shared_total;
  const cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x;
  unsigned cluster_id;  // the cluster's index in the grid: its sample (no division)
  asm("mov.u32 %0, %%clusterid.x;" : "=r"(cluster_id));
  const int64_t n = cluster_id;
  const int64_t b = static_cast<int64_t>(cluster.block_rank());
  const Seed seed = load_seed(p);
  const auto first_of = [&](int s) { return (b * G + s) * kChunk + tid * kElems; };
  // Every chunk of the block inside the row, in 16-byte packs: loads and stores without the
  // bounds tests (block-uniform).
  const bool whole = p.vec_out && (b + 1) * G * kChunk <= p.L;
  acc_t a[G][kElems], local[G];
#pragma unroll
  for (int s = 0; s < G; ++s) {
    if (whole) {
      load_packs(p.x + n * p.xs0 + first_of(s), a[s]);
    } else {
      load_elems(p.x + n * p.xs0, p.xs1, first_of(s), p.L, p.vec_x, a[s]);
    }
  }
#pragma unroll
  for (int s = 0; s < G; ++s) local[s] = abs_sum(a[s]);
  chunk_sums<acc_t, G>(local, warp_sums, partial);
  cluster.sync();  // every block of the sample has its partials in shared memory (and runs)
  if (tid < p.K) {
    partials[tid] = *cluster.map_shared_rank(&partial[tid % G], static_cast<unsigned>(tid / G));
  }
  __syncthreads();
  if (tid == 0) {
    acc_t carry = 0;
    for (int64_t k = 0; k < p.K; ++k) carry += partials[k];  // sap_prefix_kernel's order
    shared_total = carry;
  }
  __syncthreads();
  const Total<acc_t> tot(shared_total);
  // This block's reads of its siblings' partials are done (their values used): they may exit
  // once all have arrived. Relaxed: no memory of this block is published by it (cg's arrive
  // releases, a MEMBAR.GPU a thread).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  const acc_t r = static_cast<acc_t>(p.r);
  const uint64_t row = static_cast<uint64_t>(n) * static_cast<uint64_t>(p.L);
  // Chunks in pairs where G > 1: four Philox evaluations side by side (one key schedule).
  constexpr int S = G > 1 ? 2 : 1;
#pragma unroll
  for (int s0 = 0; s0 < G; s0 += S) {
    acc_t g[S][kElems];
    uint64_t counters[S * kPacks];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int64_t j0 = first_of(s0 + s);
      if (p.same) {
#pragma unroll
        for (int i = 0; i < kElems; ++i) g[s][i] = a[s0 + s][i];
      } else if (whole) {  // the source is needed from here on only: loaded late
        load_packs(p.src + n * p.ss0 + j0, g[s]);
      } else {
        load_elems(p.src + n * p.ss0, p.ss1, j0, p.L, p.vec_out, g[s]);
      }
      const uint64_t c0 = (row + static_cast<uint64_t>(j0)) / 4;
#pragma unroll
      for (int h = 0; h < kPacks; ++h) counters[s * kPacks + h] = c0 + h;
    }
    Philox4 w[S * kPacks];
    philox_n(seed.key, counters, seed.stream, w);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      acc_t o[kElems];
#pragma unroll
      for (int h = 0; h < kPacks; ++h) {
        bernoulli_pack(w[s * kPacks + h], a[s0 + s] + h * kItems, g[s] + h * kItems, tot, r,
                       o + h * kItems);
      }
      const int64_t j0 = first_of(s0 + s);
      if (whole) {
        store_packs(p.out + n * p.os0 + j0, o);
      } else {
        store_elems(p.out + n * p.os0, p.os1, j0, p.L, p.vec_out, o);
      }
    }
  }
  cluster.barrier_wait();  // no sibling still reads this block's partials
#elif defined(__CUDA_ARCH__)
  __trap();  // the host launches it only where sm_90 code runs
#endif
}

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % (kItems * t.element_size()) == 0;
}

// Packs of 4 from element 0 of each row.
bool rows_vec(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) % kItems == 0) && aligned(t);
}

// Packs of 4 at the global values n L + j that are multiples of 4.
bool flat_vec(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) == 1 || (t.stride(0) - t.size(1)) % kItems == 0) &&
         aligned(t);
}

template <typename scalar_t>
using SapKernel = void (*)(const SapParams<scalar_t>);

// Chunks a block at most: double's 4 chunks (32 values a thread) spill in 128 registers.
template <typename scalar_t>
constexpr int max_block_chunks() {
  return sizeof(scalar_t) == 8 ? 2 : kClusterMaxChunksPerBlock;
}

template <typename scalar_t>
SapKernel<scalar_t> cluster_kernel(int G) {
  static_assert(kClusterMaxChunksPerBlock == 4, "one instance for each of G = 1, 2, 4");
  if constexpr (max_block_chunks<scalar_t>() == 4) {
    if (G == 4) return sap_bernoulli_cluster_kernel<scalar_t, 4>;
  }
  return G == 2 ? sap_bernoulli_cluster_kernel<scalar_t, 2>
                : sap_bernoulli_cluster_kernel<scalar_t, 1>;
}

// The one-launch bernoulli path: G chunks a block, clusters of C = ceil(K / G) blocks; G = 0:
// two launches (a sample longer than the largest cluster holds).
struct ClusterPlan {
  int G = 0;
  int C = 0;
};

// The most chunks a block (a thread's indices, sums and total spread over the most elements)
// that still gives every SM a block, else the fewest that fit a cluster (the most blocks).
template <typename scalar_t>
ClusterPlan cluster_plan(int64_t N, int64_t K, int device, int sms) {
  ClusterPlan plan;
  for (const int G : {4, 2, 1}) {
    if (G > max_block_chunks<scalar_t>()) continue;
    const int64_t C = (K + G - 1) / G;
    if (C > kClusterMaxBlocks || N > std::numeric_limits<int32_t>::max() / C) continue;
    if (C > 8 && max_cluster_size(cluster_kernel<scalar_t>(G), device, kThreads, 0,
                                  kClusterMaxBlocks) < C) {
      continue;
    }
    plan = {G, static_cast<int>(C)};
    if (N * C >= sms) break;
  }
  return plan;
}

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>(items, std::numeric_limits<int32_t>::max()));
}

at::Tensor sap_cuda_common(const at::Tensor& src, const at::Tensor& x, const at::Tensor& seed,
                           int64_t r, bool exact) {
  TORCH_CHECK(x.is_cuda(), "sap (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(src);
  if (x.numel() == 0) return out;
  const int64_t N = x.size(0), L = x.size(1);
  const int64_t K = (L + kChunk - 1) / kChunk;
  // Draw chunks: kDrawGroup * W draws, W as small as keeps NB <= kMaxDrawChunks (the span from the
  // first value's multiple of 4 to the last value is at most r + 4).
  const int64_t W = exact ? std::max<int64_t>(1, (r + 4 + kDrawGroup * kMaxDrawChunks - 1) /
                                                     (kDrawGroup * kMaxDrawChunks))
                          : 1;
  const int64_t NB = exact ? (r + 4 + kDrawGroup * W - 1) / (kDrawGroup * W) : 0;
  const int64_t KW = (L + 3 + kWriteChunk - 1) / kWriteChunk;
  const bool same = src.is_same(x);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sap_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Bernoulli samples of up to 64 chunks: one launch, a cluster a sample, where sm_90 code
    // runs.
    const ClusterPlan plan =
        !exact && L % kItems == 0 && at::cuda::getCurrentDeviceProperties()->major >= 9 &&
                has_sm90_image(cluster_kernel<scalar_t>(1), x.get_device())
            ? cluster_plan<scalar_t>(N, K, x.get_device(),
                                     at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
            : ClusterPlan{};
    const bool clustered = plan.G > 0;
    at::Tensor ws = at::empty({clustered ? 0 : N * (K + NB)},
                              x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const bool stored = exact && W == 1 && r <= kStoreMaxRatio * L;
    at::Tensor kept_draws = at::empty({stored ? N * NB * kDrawGroup : 0},
                                      x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    SapParams<scalar_t> p{};
    p.x = x.const_data_ptr<scalar_t>();
    p.src = src.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.seed = seed_arg(seed, x);
    p.ws = ws.mutable_data_ptr<acc_t>();
    p.draws = stored ? kept_draws.mutable_data_ptr<acc_t>() : nullptr;
    p.stored = stored;
    p.N = N, p.L = L, p.r = r;
    p.xs0 = x.stride(0), p.xs1 = x.stride(1);
    p.ss0 = src.stride(0), p.ss1 = src.stride(1);
    p.os0 = out.stride(0), p.os1 = out.stride(1);
    p.K = K, p.NB = NB, p.W = W, p.KW = KW;
    p.same = same;
    p.vec_x = rows_vec(x);
    p.vec_out = exact || clustered ? rows_vec(x) && rows_vec(src) && rows_vec(out)
                                   : flat_vec(x) && flat_vec(src) && flat_vec(out);
    if (clustered) {
      const SapKernel<scalar_t> kernel = cluster_kernel<scalar_t>(plan.G);
      launch_clusters(kernel, static_cast<unsigned>(N * plan.C), kThreads, 0, stream,
                      static_cast<unsigned>(plan.C), p);
      return;
    }
    sap_partials_kernel<scalar_t><<<grid_for(N * (K + NB)), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p.own_total = !exact && K <= kBernoulliOwnTotal;
    p.own_prefix = exact && K <= kMergeOwnPrefix && NB <= kMergeOwnPrefix;
    if (!p.own_total && !p.own_prefix) {
      sap_prefix_kernel<acc_t><<<grid_for(N), kThreads, 0, stream>>>(p.ws, N, K, NB);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (exact) {
      sap_merge_kernel<scalar_t><<<grid_for(N * K), kThreads, 0, stream>>>(p);
    } else {
      sap_bernoulli_kernel<scalar_t><<<grid_for(N * KW), kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sap_cuda(const at::Tensor& x, const at::Tensor& seed, int64_t r, bool exact) {
  check_sap_args(x, seed, r);
  return sap_cuda_common(x, x, seed, r, exact);
}

at::Tensor sap_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& seed,
                             int64_t r, bool exact) {
  check_sap_backward_args(grad, x, seed, r);
  return sap_cuda_common(grad, x, seed, r, exact);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("sap", &sap_cuda);
  m.impl("_sap_backward", &sap_backward_cuda);
}

}  // namespace pyprune
