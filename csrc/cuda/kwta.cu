// k-WTA on CUDA: the k-th largest key of every (n, c) group and the masked write, in one launch.
//
// Selection runs on the order-preserving unsigned keys of kwta.h (NaN = largest key), so the
// k-th largest value is found digit by digit, most significant first, without sorting:
//
// * Groups of at most 1024 elements (channel mode on small maps, e.g. 512x4x4 or 64x32x32):
//   a warp holds T = ceil(L / 32) rounded up to a power of two lanes per group (so one warp does
//   32 / T groups), each lane keeps 32 keys in registers. A 32x32 bit transpose turns those keys
//   into bit planes (plane b, bit j = bit b of key j), after which each step of a bitwise radix
//   select costs one AND, one popcount and log2(T) shuffles, instead of one compare per key per
//   bit. No shared memory and no atomics.
// * Larger groups: one block per group runs a radix select with 11-bit digits (3 passes for
//   32-bit keys): a shared-memory histogram of the digit over the candidates, a block scan that
//   finds the bucket holding rank k, repeat. The first pass reads the group from global memory;
//   as soon as the candidates of a block fit in shared memory (usually after the first digit),
//   the pass that reads them also copies their keys there, and later passes never touch global
//   memory again. A last pass writes the masked output.
// * Few large groups on sm_90: a thread-block cluster of up to 16 blocks (8 where the GPU
//   schedules no more) shares a group; each block histograms its slice and reads its siblings'
//   histograms through distributed shared memory, so every block picks the same digit. No
//   global scratch, no grid-wide barrier: the launch stays a single kernel and CUDA-graph safe.
//   All groups are in flight at once (see launch_block).
//
// Half and bfloat16 keys are floats whose low 13 / 16 bits follow from the sign bit, so the
// select skips those bits (2 passes instead of 3) and complete_key restores them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../kwta.h"
#include "cluster.cuh"

namespace pyprune {
namespace {

namespace cg = cooperative_groups;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRadixBits = 11;
constexpr int kMaxBins = 1 << kRadixBits;
constexpr int kHistBytes = kMaxBins * sizeof(uint32_t);
// Candidate keys kept in shared memory per block (plus one histogram: 32 KiB a block), and in
// cluster mode (three histograms: 40 KiB). Both stay under the 48 KiB default limit.
constexpr int kCandBytes = 24 * 1024;
constexpr int kClusterCandBytes = 16 * 1024;
constexpr int kWarpMaxGroup = 1024;  // 32 lanes x 32 keys
constexpr int kWarpKernelThreads = 256;
constexpr int kBackwardThreads = 256;
// Blocks a cluster at most (above the portable 8: sm_90 GPUs whose GPCs hold them, as
// max_cluster_size finds).
constexpr int kMaxCluster = 16;
// A cluster block should still stream at least this many elements per pass: 8192 (32 KiB of
// float32, one round of 4 16-byte packs per thread of 512) lets a batch of 8 groups of 64K
// elements take 8 blocks each (64 CTAs) rather than 4, halving the chain of each pass.
constexpr int64_t kMinClusterSlice = 8192;

// Key bits below this are implied by the sign bit for values that came from a 16-bit float.
template <typename scalar_t>
struct ImpliedLowBits {
  static constexpr int value = 0;
};
template <>
struct ImpliedLowBits<c10::Half> {
  static constexpr int value = 13;  // float mantissa 23 bits, half 10
};
template <>
struct ImpliedLowBits<c10::BFloat16> {
  static constexpr int value = 16;  // float mantissa 23 bits, bfloat16 7
};

// Restores the low `lo` bits of a key of a 16-bit float value: a float with a zero low mantissa
// has key = bits | sign (low bits 0) when non-negative and ~bits (low bits 1) when negative. The
// NaN key (all ones) comes back with its low bits clear: still a NaN once mapped by from_key.
template <typename U>
C10_HOST_DEVICE inline U complete_key(U prefix, int lo) {
  if (lo == 0) return prefix;
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  return (prefix & sign) ? prefix : (prefix | ((U(1) << lo) - 1));
}

// In-place transpose of a 32x32 bit matrix: afterwards bit j of a[b] is what was bit b of a[j].
// Each round swaps bit s of the row index with bit s of the column index (s = 16, 8, ..., 1).
C10_HOST_DEVICE inline void transpose32(uint32_t (&a)[32]) {
  constexpr uint32_t masks[5] = {0x0000FFFFu, 0x00FF00FFu, 0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
#pragma unroll
  for (int r = 0; r < 5; ++r) {
    const int s = 16 >> r;
    const uint32_t m = masks[r];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (j & s) continue;
      const uint32_t t = ((a[j] >> s) ^ a[j + s]) & m;
      a[j + s] ^= t;
      a[j] ^= t << s;
    }
  }
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t val[kVec];
};

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / sizeof(scalar_t);
}

template <typename scalar_t>
struct KwtaParams {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ out;
  scalar_t* __restrict__ threshold;  // (N, C) contiguous
  int64_t groups, C, L;
  int64_t xs0, xs1, xs2, os0, os1, os2;
  uint32_t k;
  bool absolute;
  // Block path: blocks per group (> 1 only as a thread-block cluster on sm_90), the elements
  // each of them owns (a multiple of the vector width), and the shared candidate capacity.
  int cluster;
  int64_t chunk;
  uint32_t cap;
};

// ---------------------------------------------------------------------------------------------
// Warp path: L <= 1024.

// The sum of v over the T lanes of this lane's group (T a power of two, groups aligned to T
// lanes). T is a template parameter so that the butterfly unrolls: with a run-time T, the
// shuffles sat in a loop that the compiler wrapped in divergence handling (WARPSYNC /
// ENDCOLLECTIVE). A whole warp's sum (T = 32, groups of 513 to 1024 elements) is one redux.sync
// from sm_80 on.
template <int T>
__device__ __forceinline__ uint32_t group_sum(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (T == 32) {
    return __reduce_add_sync(kFullMask, v);
  } else
#endif
  {
#pragma unroll
    for (int off = T / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
  }
}

// Blocks a SM the warp kernel is built for: 2 (<= 128 registers; 32 keys a lane and the bit
// planes stay in registers); float64, whose keys take register pairs, 1 (it spilled at 128 with
// general strides).
template <typename scalar_t>
constexpr int warp_min_blocks() {
  return std::is_same_v<scalar_t, double> ? 1 : 2;
}

// T lanes a group (a power of two, 32 * T >= L); kUnit: x and out rows at unit stride, so that
// the 32 keys of a lane sit at constant offsets T apart (no 64-bit address arithmetic a key).
template <typename scalar_t, int T, bool kUnit>
__global__ void __launch_bounds__(kWarpKernelThreads, (warp_min_blocks<scalar_t>()))
    kwta_warp_kernel(const KwtaParams<scalar_t> p) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  using U = typename KeyTraits<scalar_t>::key_t;
  constexpr int kWords = sizeof(U) / 4;
  constexpr int kBits = sizeof(U) * 8;
  constexpr int kLo = ImpliedLowBits<scalar_t>::value;

  const int lane = threadIdx.x & 31;
  const int lt = lane & (T - 1);  // lane within the group's T lanes (T is a power of two)
  const int groups_per_warp = 32 / T;
  const int64_t warps_per_block = kWarpKernelThreads / 32;
  const int64_t warp_stride = int64_t(gridDim.x) * warps_per_block;

  // The loop bound depends on the warp only, so every lane reaches every shuffle.
  for (int64_t w = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32;
       w * groups_per_warp < p.groups; w += warp_stride) {
    const int64_t g = w * groups_per_warp + lane / T;
    const bool valid = g < p.groups;
    const int64_t n = valid ? g / p.C : 0, c = valid ? g - n * p.C : 0;
    const scalar_t* xg = p.x + n * p.xs0 + c * p.xs1;

    // Key j (j < count) of this lane is element lt + T * j of the group, read from xl[j * step];
    // words[q][j] is its q-th 32-bit word. 32 * T >= L, so count <= 32.
    const int count = valid ? static_cast<int>((p.L - lt + T - 1) / T) : 0;
    const scalar_t* xl = xg + lt * p.xs2;
    const int64_t step = kUnit ? T : T * p.xs2;
    uint32_t words[kWords][32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      U key = 0;
      if (j < count) key = to_key<acc_t, U>(static_cast<acc_t>(xl[j * step]), p.absolute);
#pragma unroll
      for (int q = 0; q < kWords; ++q) words[q][j] = static_cast<uint32_t>(key >> (32 * q));
    }
#pragma unroll
    for (int q = 0; q < kWords; ++q) transpose32(words[q]);
    // bit j: key j exists and matches the prefix selected so far
    uint32_t cand = count >= 32 ? kFullMask : (1u << count) - 1;

    // Bitwise radix select: rank is the 1-based rank of the target among the candidates.
    uint32_t rank = p.k;
    U prefix = 0;
#pragma unroll
    for (int b = kBits - 1; b >= kLo; --b) {
      const uint32_t plane = words[b / 32][b % 32];
      const uint32_t ones = plane & cand;
      // Candidates of the group with bit b set.
      const uint32_t n_ones = group_sum<T>(static_cast<uint32_t>(__popc(ones)));
      const bool one = n_ones >= rank;
      prefix |= one ? (U(1) << b) : U(0);
      rank = one ? rank : rank - n_ones;
      cand = one ? ones : (cand & ~plane);
    }
    if (!valid) continue;

    const acc_t t = from_key<acc_t, U>(complete_key<U>(prefix, kLo));
    if (lt == 0) p.threshold[g] = static_cast<scalar_t>(t);
    scalar_t* ol = p.out + n * p.os0 + c * p.os1 + lt * p.os2;
    const int64_t out_step = kUnit ? T : T * p.os2;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (j < count) {
        const scalar_t v = xl[j * step];
        ol[j * out_step] = keep<acc_t>(v, t, p.absolute) ? v : scalar_t(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Block path: L > 1024, one block (or one cluster of blocks) per group.

template <typename scalar_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* __restrict__ base,
                                                          int64_t stride, int64_t i) {
  if constexpr (kVec == 1) {
    Pack<scalar_t, 1> v;
    v.val[0] = base[i * stride];
    return v;
  } else {
    return *reinterpret_cast<const Pack<scalar_t, kVec>*>(base + i);
  }
}

// Appends this thread's hits of a trip (bit j of `hits`: keys[j]) to cand: a warp scan of the
// threads' counts gives each its offset and one shared atomic a warp its base, so a trip costs
// ~4 instructions an element plus ~20 a warp, never a ballot and shuffle chain an element.
// The list's order follows the atomics' and does not matter: only its counts are used.
template <int kTrip, typename U>
__device__ __forceinline__ void append_candidates(const U (&keys)[kTrip], uint32_t hits,
                                                  U* __restrict__ cand, uint32_t* n_cand) {
  if (!__any_sync(kFullMask, hits != 0)) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const uint32_t count = static_cast<uint32_t>(__popc(hits));
  uint32_t inclusive = count;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t v = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += v;
  }
  uint32_t base = 0;
  if (lane == 31) base = atomicAdd(n_cand, inclusive);
  uint32_t slot = __shfl_sync(kFullMask, base, 31) + inclusive - count;
#pragma unroll
  for (int j = 0; j < kTrip; ++j) {
    if ((hits >> j) & 1u) cand[slot++] = keys[j];
  }
}

// One histogram pass over this block's slice [begin, end) of a group in global memory: every
// key that `matches` the prefix adds one to the bin of its `digit`. The add is a predicated
// shared atomic with no warp collective around it (lanes of a warp on one bin are summed by
// the hardware in one ATOMS.POPC.INC, so ties cost no more), so the trip's 8-16 elements a
// thread are independent and their loads, keys and atomics overlap. Where `collect`, the
// matching keys are also appended to cand (append_candidates). Trips depend only on the warp.
// kVec > 1 needs stride 1, 16-byte aligned rows, and begin, end multiples of kVec.
template <int kThreads, int kVec, typename scalar_t, typename U, typename Matches, typename Digit>
__device__ __forceinline__ void histogram_slice(const scalar_t* __restrict__ base, int64_t stride,
                                                int64_t begin, int64_t end, bool absolute,
                                                const Matches& matches, const Digit& digit,
                                                bool collect, uint32_t* hist,
                                                U* __restrict__ cand, uint32_t* n_cand) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  constexpr int kUnroll = kVec == 8 ? 2 : kVec == 1 ? 8 : 4;  // 8 to 16 elements in flight
  constexpr int kTrip = kUnroll * kVec;
  constexpr int64_t kRow = int64_t(kThreads) * kVec;
  const int64_t warp_first = begin + int64_t(threadIdx.x & ~31) * kVec;
  const int64_t mine = int64_t(threadIdx.x & 31) * kVec;
  for (int64_t i0 = warp_first; i0 < end; i0 += kRow * kUnroll) {
    Pack<scalar_t, kVec> v[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + mine + u * kRow;
      if (i < end) v[u] = load_pack<scalar_t, kVec>(base, stride, i);
    }
    U keys[kTrip];
    uint32_t hits = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in_range = i0 + mine + u * kRow < end;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int j = u * kVec + e;
        keys[j] = to_key<acc_t, U>(static_cast<acc_t>(v[u].val[e]), absolute);
        const bool hit = in_range && matches(keys[j]);
        if (hit) atomicAdd(&hist[digit(keys[j])], 1u);
        hits |= static_cast<uint32_t>(hit) << j;
      }
    }
    if (collect) append_candidates<kTrip>(keys, hits, cand, n_cand);
  }
}

template <int kThreads, int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void masked_write(const KwtaParams<scalar_t>& p,
                                             const scalar_t* __restrict__ xg,
                                             scalar_t* __restrict__ og, int64_t begin,
                                             int64_t end, acc_t t) {
  constexpr int kUnroll = kVec == 8 ? 2 : 4;  // 16-bit packs unpack into twice the registers
  constexpr int64_t kRow = int64_t(kThreads) * kVec;
  for (int64_t i0 = begin + int64_t(threadIdx.x) * kVec; i0 < end; i0 += kRow * kUnroll) {
    Pack<scalar_t, kVec> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kRow;
      if (i < end) v[u] = load_pack<scalar_t, kVec>(xg, p.xs2, i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kRow;
      if (i >= end) continue;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        v[u].val[e] = keep<acc_t>(v[u].val[e], t, p.absolute) ? v[u].val[e] : scalar_t(0);
      if constexpr (kVec == 1) {
        og[i * p.os2] = v[u].val[0];
      } else {
        *reinterpret_cast<Pack<scalar_t, kVec>*>(og + i) = v[u];
      }
    }
  }
}

struct Pick {
  uint32_t digit;  // bucket holding the target
  uint32_t rank;   // the target's rank within that bucket
  uint32_t local;  // candidates of this block in that bucket
};

// Finds the bucket d with above(d) < rank <= above(d) + hist[d], above(d) = sum of hist[> d].
// Each thread owns a run of consecutive bins; a block-wide suffix sum over the runs tells the one
// thread whose run holds the target, which walks it and publishes the result in *pick. The
// caller synchronizes before reading *pick. Needs sum(hist) >= rank >= 1.
template <int kThreads>
__device__ __forceinline__ void pick_bucket(const uint32_t* hist, const uint32_t* local_hist,
                                            int bins, uint32_t rank, uint32_t* warp_sums,
                                            Pick* pick) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (bins + kThreads - 1) / kThreads;
  const int lo = min(tid * per, bins), hi = min(lo + per, bins);
  uint32_t mine = 0;
  for (int b = lo; b < hi; ++b) mine += hist[b];
  uint32_t suffix = mine;  // inclusive suffix sum over this warp's lanes
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t v = __shfl_down_sync(kFullMask, suffix, off);
    if (lane + off < 32) suffix += v;
  }
  if (lane == 0) warp_sums[warp] = suffix;
  __syncthreads();
  uint32_t above = suffix - mine;
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) above += w > warp ? warp_sums[w] : 0u;  // independent loads
  if (above < rank && rank - above <= mine) {
    for (int b = hi - 1; b >= lo; --b) {
      const uint32_t count = hist[b];
      if (rank - above <= count) {
        pick->digit = b;
        pick->rank = rank - above;
        pick->local = local_hist[b];
        break;
      }
      above += count;
    }
  }
}

// Blocks a SM the block kernel is built for: 1024 threads (<= 64 registers, 50% occupancy); the
// float64 kernels, whose keys and values take register pairs, 512 threads (<= 128 registers),
// which they need not to spill on sm_80.
template <typename scalar_t, int kThreads>
constexpr int block_min_blocks() {
  return (std::is_same_v<scalar_t, double> ? 512 : 1024) / kThreads;
}

template <typename scalar_t, int kThreads, bool kVectorized>
__global__ void __launch_bounds__(kThreads, (block_min_blocks<scalar_t, kThreads>()))
    kwta_block_kernel(const KwtaParams<scalar_t> p) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  using U = typename KeyTraits<scalar_t>::key_t;
  constexpr int kVec = kVectorized ? vec_width<scalar_t>() : 1;
  constexpr int kBits = sizeof(U) * 8;
  constexpr int kLo = ImpliedLowBits<scalar_t>::value;

  // Dynamic shared memory: one histogram per pass parity (the second only in cluster mode, so a
  // block never clears a histogram that a sibling may still be reading), the cluster-wide sum
  // (cluster mode), then the candidate keys.
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint32_t n_cand;
  __shared__ uint32_t warp_sums[kThreads / 32];
  __shared__ Pick pick;
  const bool clustered = p.cluster > 1;
  U* cand = reinterpret_cast<U*>(smem + (clustered ? 3 : 1) * kHistBytes);

  const int tid = threadIdx.x;
  int rank_in_cluster = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (clustered) rank_in_cluster = static_cast<int>(cg::this_cluster().block_rank());
#elif defined(__CUDA_ARCH__)
  if (clustered) __trap();  // the host launches clusters only where sm_90 code runs
#endif
  const int64_t begin = std::min(p.L, rank_in_cluster * p.chunk);
  const int64_t end = std::min(p.L, begin + p.chunk);

  for (int64_t g = blockIdx.x / p.cluster; g < p.groups; g += gridDim.x / p.cluster) {
    const int64_t n = g / p.C, c = g - n * p.C;
    const scalar_t* xg = p.x + n * p.xs0 + c * p.xs1;

    U prefix = 0, prefix_mask = 0;
    uint32_t rank = p.k;
    uint32_t local = static_cast<uint32_t>(end - begin);  // this block's candidates
    bool in_shared = false;  // candidates already copied to cand[0, n_cand)
    int shift = kBits - kRadixBits, bins = kMaxBins, parity = 0;
    if (tid == 0) n_cand = 0;
    for (;;) {
      uint32_t* hist = reinterpret_cast<uint32_t*>(smem + parity * kHistBytes);
      for (int b = tid; b < bins; b += kThreads) hist[b] = 0;
      __syncthreads();

      const uint32_t digit_mask = bins - 1;
      const auto matches = [=](U key) { return (key & prefix_mask) == prefix; };
      const auto digit = [=](U key) { return static_cast<uint32_t>(key >> shift) & digit_mask; };
      if (in_shared) {
        const uint32_t count = n_cand;
        for (uint32_t j = tid; j < count; j += kThreads) {
          const U key = cand[j];
          if (matches(key)) atomicAdd(&hist[digit(key)], 1u);
        }
      } else {
        const bool collect = local <= p.cap;  // block-uniform
        histogram_slice<kThreads, kVec>(xg, p.xs2, begin, end, p.absolute, matches, digit,
                                        collect, hist, cand, &n_cand);
        in_shared = collect;
      }

      const uint32_t* total = hist;
      if (clustered) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        cg::cluster_group cluster = cg::this_cluster();
        uint32_t* merged = reinterpret_cast<uint32_t*>(smem + 2 * kHistBytes);
        cluster.sync();  // every sibling's histogram of this pass is complete and visible
        // A thread's bins from every sibling: the loads of 4 siblings at a time are in flight
        // together (one distributed shared memory round trip per 4 siblings, not per value).
        constexpr int kPer = (kMaxBins + kThreads - 1) / kThreads;
        uint32_t sum[kPer] = {};
#pragma unroll 4
        for (int r = 0; r < p.cluster; ++r) {
          const uint32_t* sibling = cluster.map_shared_rank(hist, r);
#pragma unroll
          for (int j = 0; j < kPer; ++j) {
            const int b = tid + j * kThreads;
            if (b < bins) sum[j] += sibling[b];
          }
        }
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int b = tid + j * kThreads;
          if (b < bins) merged[b] = sum[j];
        }
        total = merged;
#endif
      }
      __syncthreads();
      pick_bucket<kThreads>(total, hist, bins, rank, warp_sums, &pick);
      __syncthreads();

      prefix |= U(pick.digit) << shift;
      prefix_mask |= U(bins - 1) << shift;
      rank = pick.rank;
      local = pick.local;
      if (shift == kLo) break;
      const int next = std::max(shift - kRadixBits, kLo);
      bins = 1 << (shift - next);
      shift = next;
      parity ^= clustered ? 1 : 0;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Siblings may still read this block's last histogram; it is reused by the next group, and
    // shared memory must outlive every remote access.
    if (clustered) cg::this_cluster().sync();
#endif

    const acc_t t = from_key<acc_t, U>(complete_key<U>(prefix, kLo));
    if (tid == 0 && rank_in_cluster == 0) p.threshold[g] = static_cast<scalar_t>(t);
    masked_write<kThreads, kVec>(p, xg, p.out + n * p.os0 + c * p.os1, begin, end, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_x = grad where keep(x, threshold), one elementwise pass.

template <typename scalar_t>
struct BackwardParams {
  const scalar_t* __restrict__ grad;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ threshold;
  scalar_t* __restrict__ gx;
  int64_t gs0, gs1, gs2, xs0, xs1, xs2, ts0, ts1, os0, os1, os2;
  bool absolute;
};

template <typename scalar_t, typename index_t, bool kVectorized>
__global__ void __launch_bounds__(kBackwardThreads)
    kwta_backward_kernel(const BackwardParams<scalar_t> p, const index_t packs,
                         const at::cuda::detail::IntDivider<index_t> per_group,
                         const at::cuda::detail::IntDivider<index_t> per_sample) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  constexpr int kVec = kVectorized ? vec_width<scalar_t>() : 1;
  const index_t step = index_t(gridDim.x) * blockDim.x;
  for (index_t v = index_t(blockIdx.x) * blockDim.x + threadIdx.x; v < packs; v += step) {
    const auto gi = per_group.divmod(v * kVec);  // (group, element); a pack never straddles
    const auto nc = per_sample.divmod(gi.div);
    const int64_t n = nc.div, c = nc.mod, i = gi.mod;
    const acc_t t = static_cast<acc_t>(p.threshold[n * p.ts0 + c * p.ts1]);
    const auto xv = load_pack<scalar_t, kVec>(p.x + n * p.xs0 + c * p.xs1, p.xs2, i);
    auto gv = load_pack<scalar_t, kVec>(p.grad + n * p.gs0 + c * p.gs1, p.gs2, i);
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (!keep<acc_t>(xv.val[e], t, p.absolute)) gv.val[e] = scalar_t(0);
    scalar_t* og = p.gx + n * p.os0 + c * p.os1;
    if constexpr (kVec == 1) {
      og[i * p.os2] = gv.val[0];
    } else {
      *reinterpret_cast<Pack<scalar_t, kVec>*>(og + i) = gv;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Whether every (n, c) row of t can be read as aligned vectors of `vec` elements.
bool rows_vectorizable(const at::Tensor& t, int vec) {
  const auto aligned = [&](int d) { return t.size(d) == 1 || t.stride(d) % vec == 0; };
  return t.stride(2) == 1 && t.size(2) % vec == 0 && aligned(0) && aligned(1) &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename scalar_t, int kThreads, bool kVectorized>
void launch_block(KwtaParams<scalar_t> p, const cudaDeviceProp& prop, int device,
                  cudaStream_t stream) {
  using U = typename KeyTraits<scalar_t>::key_t;
  const auto kernel = kwta_block_kernel<scalar_t, kThreads, kVectorized>;
  constexpr int vec = kVectorized ? vec_width<scalar_t>() : 1;

  // Few groups leave SMs idle: split each group over a cluster (up to 16 blocks where the GPU
  // schedules them) so that the grid reaches two blocks an SM. Every group is in flight at once,
  // x too large for the L2 included: each radix pass has a fixed cost of ~4 us (the H200 run of
  // the former launch, which ran groups in L2-sized rounds so that the later passes read L2,
  // paid it once a round: 422 us at 32x256x56x56 in 4 rounds, where rereading x from DRAM in
  // one round is bound near 100 us by bandwidth).
  int cluster = 1;
  const int64_t target_blocks = 2 * int64_t(prop.multiProcessorCount);
  const size_t cluster_smem = 3 * kHistBytes + kClusterCandBytes;
  if (kThreads == 512 && prop.major >= 9 && p.groups < target_blocks &&
      p.L >= 2 * kMinClusterSlice && has_sm90_image(kernel, device)) {
    const int most = max_cluster_size(kernel, device, kThreads, cluster_smem, kMaxCluster);
    cluster = static_cast<int>(
        std::min<int64_t>({most, target_blocks / p.groups, p.L / kMinClusterSlice}));
  }
  p.cluster = cluster;
  p.chunk = (p.L + cluster - 1) / cluster;
  p.chunk = (p.chunk + vec - 1) / vec * vec;
  const int cand_bytes = cluster > 1 ? kClusterCandBytes : kCandBytes;
  p.cap = static_cast<uint32_t>(cand_bytes / sizeof(U));
  const size_t smem = cluster > 1 ? cluster_smem : kHistBytes + kCandBytes;
  const int64_t clusters = std::min<int64_t>(p.groups, (int64_t(1) << 30) / cluster);
  const unsigned blocks = static_cast<unsigned>(clusters * cluster);

  if (cluster == 1) {
    kernel<<<blocks, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  launch_clusters(kernel, blocks, kThreads, smem, stream, static_cast<unsigned>(cluster), p);
}

template <typename scalar_t>
void kwta_cuda_impl(const at::Tensor& x, int64_t k, bool absolute, at::Tensor& out,
                    at::Tensor& threshold) {
  KwtaParams<scalar_t> p{};
  p.x = x.const_data_ptr<scalar_t>();
  p.out = out.mutable_data_ptr<scalar_t>();
  p.threshold = threshold.mutable_data_ptr<scalar_t>();
  p.C = x.size(1);
  p.L = x.size(2);
  p.groups = x.size(0) * p.C;
  p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
  p.os0 = out.stride(0), p.os1 = out.stride(1), p.os2 = out.stride(2);
  p.k = static_cast<uint32_t>(k);
  p.absolute = absolute;
  p.cluster = 1;

  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const int device = x.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (p.L <= kWarpMaxGroup) {
    int T = 1;
    while (T * 32 < p.L) T *= 2;
    const int64_t warps = (p.groups + 32 / T - 1) / (32 / T);
    const int64_t per_block = kWarpKernelThreads / 32;
    const int64_t blocks = std::min<int64_t>((warps + per_block - 1) / per_block,
                                             int64_t(prop.multiProcessorCount) * 64);
    const auto launch = [&](auto lanes) {
      if (p.xs2 == 1 && p.os2 == 1) {
        kwta_warp_kernel<scalar_t, decltype(lanes)::value, true>
            <<<static_cast<unsigned>(blocks), kWarpKernelThreads, 0, stream>>>(p);
      } else {
        kwta_warp_kernel<scalar_t, decltype(lanes)::value, false>
            <<<static_cast<unsigned>(blocks), kWarpKernelThreads, 0, stream>>>(p);
      }
    };
    switch (T) {
      case 1: launch(std::integral_constant<int, 1>{}); break;
      case 2: launch(std::integral_constant<int, 2>{}); break;
      case 4: launch(std::integral_constant<int, 4>{}); break;
      case 8: launch(std::integral_constant<int, 8>{}); break;
      case 16: launch(std::integral_constant<int, 16>{}); break;
      default: launch(std::integral_constant<int, 32>{}); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int vec = vec_width<scalar_t>();
  const bool vectorized = rows_vectorizable(x, vec) && rows_vectorizable(out, vec);
  if (p.L <= 8192) {
    vectorized ? launch_block<scalar_t, 256, true>(p, prop, device, stream)
               : launch_block<scalar_t, 256, false>(p, prop, device, stream);
  } else {
    vectorized ? launch_block<scalar_t, 512, true>(p, prop, device, stream)
               : launch_block<scalar_t, 512, false>(p, prop, device, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> kwta_cuda(const at::Tensor& x, int64_t k, bool absolute) {
  check_kwta_args(x, k);
  TORCH_CHECK(x.is_cuda(), "kwta (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(2) <= std::numeric_limits<int32_t>::max(),
              "kwta (cuda): a group may hold at most 2^31 - 1 elements, got ", x.size(2));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor threshold = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.numel() == 0) return {out, threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kwta_cuda", [&] {
    kwta_cuda_impl<scalar_t>(x, k, absolute, out, threshold);
  });
  return {out, threshold};
}

template <typename scalar_t, typename index_t>
void launch_backward(const BackwardParams<scalar_t>& p, int64_t numel, int64_t C, int64_t L,
                     bool vectorized, const cudaDeviceProp& prop, cudaStream_t stream) {
  using at::cuda::detail::IntDivider;
  const int vec = vectorized ? vec_width<scalar_t>() : 1;
  const int64_t packs = numel / vec;
  const int64_t blocks = std::min<int64_t>((packs + kBackwardThreads - 1) / kBackwardThreads,
                                           int64_t(prop.multiProcessorCount) * 32);
  const IntDivider<index_t> per_group(static_cast<index_t>(L));
  const IntDivider<index_t> per_sample(static_cast<index_t>(C));
  if (vectorized) {
    kwta_backward_kernel<scalar_t, index_t, true>
        <<<unsigned(blocks), kBackwardThreads, 0, stream>>>(p, static_cast<index_t>(packs),
                                                             per_group, per_sample);
  } else {
    kwta_backward_kernel<scalar_t, index_t, false>
        <<<unsigned(blocks), kBackwardThreads, 0, stream>>>(p, static_cast<index_t>(packs),
                                                             per_group, per_sample);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor kwta_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& threshold, bool absolute) {
  check_kwta_backward_args(grad, x, threshold);
  TORCH_CHECK(x.is_cuda(), "kwta backward (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kwta_backward_cuda", [&] {
    BackwardParams<scalar_t> p{};
    p.grad = grad.const_data_ptr<scalar_t>();
    p.x = x.const_data_ptr<scalar_t>();
    p.threshold = threshold.const_data_ptr<scalar_t>();
    p.gx = gx.mutable_data_ptr<scalar_t>();
    p.gs0 = grad.stride(0), p.gs1 = grad.stride(1), p.gs2 = grad.stride(2);
    p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
    p.ts0 = threshold.stride(0), p.ts1 = threshold.stride(1);
    p.os0 = gx.stride(0), p.os1 = gx.stride(1), p.os2 = gx.stride(2);
    p.absolute = absolute;
    constexpr int vec = vec_width<scalar_t>();
    const bool vectorized = rows_vectorizable(grad, vec) && rows_vectorizable(x, vec) &&
                            rows_vectorizable(gx, vec);
    const int64_t numel = x.numel(), C = x.size(1), L = x.size(2);
    if (numel <= std::numeric_limits<int32_t>::max()) {
      launch_backward<scalar_t, uint32_t>(p, numel, C, L, vectorized, prop, stream);
    } else {
      launch_backward<scalar_t, uint64_t>(p, numel, C, L, vectorized, prop, stream);
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("kwta", &kwta_cuda);
  m.impl("_kwta_backward", &kwta_backward_cuda);
}

}  // namespace pyprune
