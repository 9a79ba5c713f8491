// CAS on CUDA, built around the sample being split across many blocks, so that the grid fills
// the GPU at every batch size and each thread keeps several 16-byte loads in flight.
//
// Forward, training (label given): two launches.
//   1. stream: one pass over x; every block reads a tile of a sample, writes out = x * w[label]
//      and the tile's per-channel partial sums to a workspace part (N, K, S) (S chunks per
//      channel; no atomics, so the sums are the same on every run);
//   2. logits: per sample (and class range), the means from the S partials in a fixed order,
//      logits = mean @ w.T + b stored in x's dtype, index = label. With more than 64 classes, 4
//      samples a block share each weight row read (half types), or, where the logits are in the
//      accumulation type (float32, float64), the kernel stores the means only and a GEMM
//      (addmm) forms the logits: one more launch, the weight read once.
// Forward, inference: the scaled write needs the argmax of the whole sample's logits, so x is
// read twice (sums, then out = x * w[argmax]; the second read comes from L2 where x fits):
//   1. stream (sums only); 2. logits, with the argmax (first index on ties, NaN largest) in the
//   same kernel when one block covers a sample's classes, else 2b. a warp per sample;
//   3. stream (write only), reading index[n].
// Backward: one pass over grad_out and x: grad_x = grad_out * w[index] + a / L, a = grad_logits
// @ w formed first (a GEMM), fused with the partial sums of grad_out * x; grad_weight =
// grad_logits.T @ mean + those sums added into the index rows, and grad_bias, in sample order
// without atomics: up to 64 classes by a gather kernel (split threads a (class, channel) cell);
// with more, by a tiled kernel (a block a 64 x 64 tile of grad_weight, the samples staged in
// shared memory), which reads each sample's sums only in the one tile row of its label.
//
// Layouts. Channel rows (x.stride(2) == 1, contiguous NCHW): a group of G lanes (a power of 2,
// G * V >= L where possible) covers a chunk of G * V columns of one channel, V = 16 bytes /
// element; consecutive groups take consecutive (channel, chunk) items, reduced by shuffles within
// the group. Channels contiguous (channels_last): TX threads cover TX * V channels, TY = 256 / TX
// threads the positions; a block sums TY * U positions (U: Slots) and reduces them in shared
// memory. Each thread loads all of its U vectors before it computes or stores anything. Strides
// that allow no 16-byte access take the same kernels with general strides: channel rows with V
// scalar loads a lane (lane-interleaved, coalesced within the group), channels_last with V = 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../cas.h"

namespace pyprune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Streaming kernels: 4 blocks of 256 threads per SM at least, so at most 64 registers.
constexpr int kStreamMinBlocks = 4;
constexpr unsigned kFullMask = 0xffffffffu;
// Backward: up to this many classes the gather kernel sums grad_logits.T @ mean itself (the
// rereads of mean stay small, and a GEMM launch is saved); more classes take the tiled
// weight-gradient kernel.
constexpr int64_t kGatherLogitsClasses = 64;
// The tiled weight-gradient kernel: a block a kTileC x kTileK tile of grad_weight, a thread a
// 4 x 4 sub-tile (16 x 16 threads).
constexpr int kTileC = 64;
constexpr int kTileK = 64;
static_assert(kTileC == kTileK, "cas_weight_grad_kernel stages both tiles in one loop");

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// What a streaming launch does with its tile.
enum Mode : int {
  kTrain = 0,  // partial sums of x, out = x * w[label]
  kSum = 1,    // partial sums of x only (inference, before the argmax is known)
  kWrite = 2,  // out = x * w[index] only (inference, after it)
  kBwd = 3,    // partial sums of grad_out * x, grad_x = grad_out * w[index] + a
};

// Vectors in flight per thread (every forward mode of one call must agree): the backward loads
// two tensors per slot, and 2-byte types take half as many, whose 8 elements a slot cost more
// registers (bfloat16 spilled at 4 slots under the 64-register bound).
template <int M, typename scalar_t>
struct Slots {
  static constexpr int value = (M == kBwd ? 2 : 4) / (sizeof(scalar_t) == 2 ? 2 : 1);
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename scalar_t>
struct StreamParams {
  using acc_t = typename CasAcc<scalar_t>::type;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ g;      // kBwd: grad_out
  scalar_t* __restrict__ out;
  const scalar_t* __restrict__ w;
  const int64_t* __restrict__ sel;     // the class of each sample: label or index
  const acc_t* __restrict__ a;         // kBwd: (N, K) contiguous, grad_logits @ weight (/ L here)
  acc_t* __restrict__ part;            // (N, K, S) contiguous
  int64_t K, L, C;
  int64_t xs0, xs1, xs2, gs0, gs1, gs2, os0, os1, os2, ws0, ws1;
  unsigned items;   // rows: K * S work items per sample; channels_last: channel vectors
  unsigned tiles;   // blocks per sample
  unsigned ctiles;  // channels_last: channel tiles per sample
  unsigned S;       // chunks per channel
  int shift;        // log2 of G (rows) or TX (channels_last)
};

template <typename scalar_t, int V>
__device__ inline Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

// A 16-byte pack goes out through st.global.v4: a plain struct or uint4 assignment was split into
// four 4-byte stores by the front end in the channels_last kernel.
template <typename scalar_t, int V>
__device__ inline void store_pack(scalar_t* p, const Pack<scalar_t, V>& o) {
  if constexpr (sizeof(Pack<scalar_t, V>) == 16) {
    unsigned w[4];
    memcpy(w, &o, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    *reinterpret_cast<Pack<scalar_t, V>*>(p) = o;
  }
}

// One element of a streaming tile in mode M: adds its term to the channel sum (x, or grad_out * x
// in backward) and returns its output (x * m, or grad_out * m + a in backward).
template <int M, typename scalar_t, typename acc_t>
__device__ inline scalar_t stream_element(scalar_t x, scalar_t g, acc_t m, acc_t a, acc_t& sum) {
  const acc_t xj = static_cast<acc_t>(x);
  if constexpr (M == kBwd) {
    const acc_t gj = static_cast<acc_t>(g);
    sum += gj * xj;
    return static_cast<scalar_t>(gj * m + a);
  } else {
    if constexpr (M != kWrite) sum += xj;
    return static_cast<scalar_t>(xj * m);
  }
}

template <typename scalar_t>
__device__ inline const scalar_t* class_row(const StreamParams<scalar_t>& p, unsigned n) {
  // The label check of a training call (pyprune.cas leaves it to this kernel: no extra launch).
  const int64_t label = p.sel[n];
  CUDA_KERNEL_ASSERT(label >= 0 && label < p.C);
  return p.w + label * p.ws0;
}

// Channel rows: item w of a sample is (channel k = w / S, chunk s = w % S) of G * V columns. With
// 16-byte packs (kPacked), lane j of its group owns the V columns from s * G * V + j * V; else
// (rows that allow no 16-byte access, e.g. 7x7 maps, or general strides) the V columns
// s * G * V + e * G + j (e < V), each a scalar load that the group's lanes coalesce, so that a
// thread still keeps U * V elements in flight (one element a slot, as before, kept a quarter as
// many bytes in flight: 34 us for 32x2048x7x7 on an H200, where 16-byte packs stream at copy).
template <typename scalar_t, int V, int M, bool kPacked>
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    cas_rows_kernel(const StreamParams<scalar_t> p) {
  using acc_t = typename CasAcc<scalar_t>::type;
  using P = Pack<scalar_t, V>;
  constexpr int U = Slots<M, scalar_t>::value;
  constexpr bool kSums = M != kWrite;
  constexpr bool kOut = M != kSum;
  const unsigned n = blockIdx.x / p.tiles, tile = blockIdx.x - n * p.tiles;
  const int tid = threadIdx.x;
  const unsigned G = 1u << p.shift, lane = tid & (G - 1), group = tid >> p.shift;
  const unsigned per_u = kThreads >> p.shift;
  const scalar_t* m_row = nullptr;
  if constexpr (kOut) m_row = class_row(p, n);
  const scalar_t* xn = p.x + n * p.xs0;
  const scalar_t* gn = M == kBwd ? p.g + n * p.gs0 : nullptr;
  scalar_t* on = p.out + n * p.os0;
  // Column of element e of this lane's share of chunk s.
  const auto column = [&](unsigned s, int e) {
    return kPacked ? (s * G + lane) * V + e : s * G * V + e * G + lane;
  };

  P xv[U], gv[U];
  acc_t mk[U], ak[U];
  unsigned ks[U], ss[U];
  bool ok[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const unsigned w = (tile * U + u) * per_u + group;
    const unsigned k = w / p.S, s = w - k * p.S;
    ks[u] = k, ss[u] = s;
    // The lane's first column is its lowest: the item has work for it where that is inside.
    ok[u] = w < p.items && column(s, 0) < p.L;
    mk[u] = ak[u] = acc_t(0);
    if (ok[u]) {
      if constexpr (kPacked) {
        xv[u] = load_pack<scalar_t, V>(xn + k * p.xs1 + column(s, 0) * p.xs2);
        if constexpr (M == kBwd) gv[u] = load_pack<scalar_t, V>(gn + k * p.gs1 + column(s, 0) * p.gs2);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const unsigned col = column(s, e);
          const bool in = col < p.L;
          xv[u].v[e] = in ? xn[k * p.xs1 + col * p.xs2] : scalar_t(0);
          if constexpr (M == kBwd) gv[u].v[e] = in ? gn[k * p.gs1 + col * p.gs2] : scalar_t(0);
        }
      }
      if constexpr (kOut) mk[u] = static_cast<acc_t>(m_row[k * p.ws1]);
      if constexpr (M == kBwd) ak[u] = p.a[n * p.K + k] / static_cast<acc_t>(p.L);
    }
  }
  acc_t sum[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    sum[u] = acc_t(0);
    if (!ok[u]) continue;
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // Columns past the row (unpacked only) were loaded as 0: they add 0 and are not stored.
      o.v[j] = stream_element<M>(xv[u].v[j], M == kBwd ? gv[u].v[j] : scalar_t(0), mk[u], ak[u],
                                 sum[u]);
    }
    if constexpr (kOut) {
      if constexpr (kPacked) {
        store_pack<scalar_t, V>(on + ks[u] * p.os1 + column(ss[u], 0) * p.os2, o);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const unsigned col = column(ss[u], j);
          if (col < p.L) on[ks[u] * p.os1 + col * p.os2] = o.v[j];
        }
      }
    }
  }
  if constexpr (kSums) {
    // The slots' butterflies interleaved; every lane takes part (invalid slots add 0).
    for (unsigned offset = G >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) sum[u] += __shfl_xor_sync(kFullMask, sum[u], offset);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // Lane 0's column starts the chunk, so it is inside the row whenever the item exists.
      if (lane == 0 && ok[u]) p.part[(n * p.K + ks[u]) * p.S + ss[u]] = sum[u];
    }
  }
}

// Channels contiguous: thread (tx, ty) owns channels k0 .. k0 + V - 1 of channel tile ct and the
// positions s * TY * U + u * TY + ty of position chunk s.
template <typename scalar_t, int V, int M>
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    cas_cl_kernel(const StreamParams<scalar_t> p) {
  using acc_t = typename CasAcc<scalar_t>::type;
  using P = Pack<scalar_t, V>;
  constexpr int U = Slots<M, scalar_t>::value;
  constexpr bool kSums = M != kWrite;
  constexpr bool kOut = M != kSum;
  __shared__ acc_t red[kSums ? kThreads * V : 1];
  const unsigned n = blockIdx.x / p.tiles, r = blockIdx.x - n * p.tiles;
  const unsigned s = r / p.ctiles, ct = r - s * p.ctiles;
  const int tid = threadIdx.x;
  const unsigned TX = 1u << p.shift, TY = kThreads >> p.shift;
  const unsigned tx = tid & (TX - 1), ty = tid >> p.shift;
  const unsigned cv = ct * TX + tx;
  const bool kvalid = cv < p.items;
  const int64_t k0 = static_cast<int64_t>(cv) * V;
  const scalar_t* xn = p.x + n * p.xs0 + k0 * p.xs1;
  const scalar_t* gn = M == kBwd ? p.g + n * p.gs0 + k0 * p.gs1 : nullptr;
  scalar_t* on = p.out + n * p.os0 + k0 * p.os1;

  P xv[U], gv[U];
  bool ok[U];
  int64_t ls[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t l = (static_cast<int64_t>(s) * U + u) * TY + ty;
    ls[u] = l;
    ok[u] = kvalid && l < p.L;
    if (ok[u]) {
      xv[u] = load_pack<scalar_t, V>(xn + l * p.xs2);
      if constexpr (M == kBwd) gv[u] = load_pack<scalar_t, V>(gn + l * p.gs2);
    }
  }
  acc_t mk[V], ak[V], sum[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mk[j] = ak[j] = sum[j] = acc_t(0);
  if (kOut && kvalid) {
    const scalar_t* m_row = class_row(p, n);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mk[j] = static_cast<acc_t>(m_row[(k0 + j) * p.ws1]);
      if constexpr (M == kBwd) ak[j] = p.a[n * p.K + k0 + j] / static_cast<acc_t>(p.L);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!ok[u]) continue;
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      o.v[j] = stream_element<M>(xv[u].v[j], M == kBwd ? gv[u].v[j] : scalar_t(0), mk[j], ak[j],
                                 sum[j]);
    }
    if constexpr (kOut) store_pack<scalar_t, V>(on + ls[u] * p.os2, o);
  }
  if constexpr (kSums) {
#pragma unroll
    for (int j = 0; j < V; ++j) red[tid * V + j] = sum[j];
    __syncthreads();
    if (ty == 0 && kvalid) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t t = 0;
        for (unsigned y = 0; y < TY; ++y) t += red[((y << p.shift) + tx) * V + j];
        p.part[(n * p.K + k0 + j) * p.S + s] = t;
      }
    }
  }
}

template <typename scalar_t>
struct LogitsParams {
  using acc_t = typename CasAcc<scalar_t>::type;
  const acc_t* __restrict__ part;  // (N, K, S)
  const scalar_t* __restrict__ w;
  const scalar_t* __restrict__ b;  // nullptr: no bias
  const int64_t* __restrict__ label;  // nullptr: inference
  scalar_t* __restrict__ logits;
  int64_t* __restrict__ index;
  acc_t* __restrict__ mean;
  int64_t N, K, L, C, S, ws0, ws1;
  int64_t cpb;      // classes per block
  unsigned cb;      // blocks per group of R samples
};

// Samples per block of the logits kernel with more than kLogitsWideClasses classes: each weight
// row a block reads serves R samples, so the weight is read N / R times from L2, not N times.
constexpr int kLogitsWideSamples = 4;
constexpr int64_t kLogitsWideClasses = 64;
// Many classes: blocks of the logits launch aimed at (8 a SM on 132 SMs), so that a warp has few
// classes to go through one after another; each block recomputes its samples' means (L2 reads).
constexpr int64_t kLogitsFillBlocks = 8 * 132;

// Block (group of R samples, cb): the samples' means in shared memory (block 0 also stores
// them), then a warp per class of the block's range; the argmax here when one block holds all
// classes of one sample (R = 1), else cas_argmax_kernel follows.
template <typename scalar_t, bool kTrain, int R>
__global__ void __launch_bounds__(kThreads) cas_logits_kernel(const LogitsParams<scalar_t> p) {
  using acc_t = typename CasAcc<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char cas_smem[];
  acc_t* means = reinterpret_cast<acc_t*>(cas_smem);  // [R][K]
  __shared__ acc_t warp_best_v[kWarps];
  __shared__ int64_t warp_best_i[kWarps];
  const unsigned grp = blockIdx.x / p.cb, cblk = blockIdx.x - grp * p.cb;
  const int64_t n0 = static_cast<int64_t>(grp) * R;
  const int rows = static_cast<int>(min(static_cast<int64_t>(R), p.N - n0));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const acc_t inv_l = acc_t(1) / acc_t(p.L);
  for (int64_t k = tid; k < p.K; k += kThreads) {
    // The R samples' partials of channel k are loaded together, then stored.
    acc_t sum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sum[r] = 0;
      if (r < rows) {
        const acc_t* pk = p.part + ((n0 + r) * p.K + k) * p.S;
        for (int64_t j = 0; j < p.S; ++j) sum[r] += pk[j];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const acc_t m = sum[r] * inv_l;
      if (r < rows && cblk == 0) p.mean[(n0 + r) * p.K + k] = m;
      means[r * p.K + k] = m;
    }
  }
  __syncthreads();

  const int64_t c0 = cblk * p.cpb, c1 = min(p.C, c0 + p.cpb);
  acc_t best_v = 0;
  int64_t best_i = -1;
  for (int64_t c = c0 + warp; c < c1; c += kWarps) {
    const scalar_t* wr = p.w + c * p.ws0;
    acc_t d[R];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = 0;
    for (int64_t k = lane; k < p.K; k += 32) {
      const acc_t wk = static_cast<acc_t>(wr[k * p.ws1]);
#pragma unroll
      for (int r = 0; r < R; ++r) d[r] += wk * means[r * p.K + k];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc_t t = warp_sum(d[r]);
      if (r >= rows) continue;
      if (p.b != nullptr) t += static_cast<acc_t>(p.b[c]);
      const scalar_t q = static_cast<scalar_t>(t);
      if (lane == 0) p.logits[(n0 + r) * p.C + c] = q;
      if constexpr (R == 1) {
        const acc_t v = static_cast<acc_t>(q);
        if (best_i < 0 || argmax_better(v, c, best_v, best_i)) best_v = v, best_i = c;
      }
    }
  }
  if constexpr (kTrain) {
    if (cblk == 0 && tid < rows) p.index[n0 + tid] = p.label[n0 + tid];
  } else {
    if (R != 1 || p.cb != 1 || p.cpb == 0) return;  // cas_argmax_kernel follows
    const int64_t n = n0;
    if (lane == 0) {
      warp_best_v[warp] = best_v;
      warp_best_i[warp] = best_i;
    }
    __syncthreads();
    if (tid == 0) {
      acc_t v = warp_best_v[0];
      int64_t i = warp_best_i[0];
      for (int w = 1; w < kWarps; ++w) {
        if (warp_best_i[w] >= 0 && argmax_better(warp_best_v[w], warp_best_i[w], v, i)) {
          v = warp_best_v[w];
          i = warp_best_i[w];
        }
      }
      p.index[n] = i;
    }
  }
}

// A warp per sample: argmax over the stored (rounded) logits, in argmax_better's total order, so
// the butterfly leaves the same winner in every lane.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cas_argmax_kernel(const scalar_t* __restrict__ logits,
                                                              int64_t* __restrict__ index,
                                                              int64_t N, int64_t C) {
  using acc_t = typename CasAcc<scalar_t>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  acc_t v = 0;
  long long i = -1;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t x = static_cast<acc_t>(logits[n * C + c]);
    if (i < 0 || argmax_better(x, c, v, i)) v = x, i = c;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t ov = __shfl_xor_sync(kFullMask, v, offset);
    const long long oi = __shfl_xor_sync(kFullMask, i, offset);
    if (oi >= 0 && (i < 0 || argmax_better(ov, oi, v, i))) v = ov, i = oi;
  }
  if (lane == 0) index[n] = i;
}

// Up to kGatherLogitsClasses classes: grad_weight[c, k] = grad_logits.T @ mean (each thread
// rereads mean[n, k] once per class, from L2) plus, where index[n] == c, the sum t of grad_out *
// x over channel k of sample n (from its S partials); index_add_ would use atomics. Every
// thread also sums grad_logits[:, c]; those of column k = 0 store it as grad_bias[c].
// A block takes kThreads / split consecutive cells (c, k), and split threads share a cell, each
// taking every split-th sample (thread group h: n = h, h + split, ...); their sums are then
// added in group order, so the result does not depend on scheduling. The loop waits on an L2
// load a sample, so one thread per cell over every sample (split = 1) is a chain of N L2
// round trips, and with few classes (C * K / 256 blocks: 3 at C = 10, K = 64) most SMs idle:
// the launch picks split (a power of two up to 32) to give every SM two blocks where it can.
// Consecutive threads take consecutive cells: the loads of mean and of the partials coalesce
// along k.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) cas_gather_rows_kernel(
    acc_t* __restrict__ gw, acc_t* __restrict__ gb, const acc_t* __restrict__ gl,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ part,
    const int64_t* __restrict__ index, int64_t N, int64_t K, int64_t C, int64_t S, int split) {
  __shared__ acc_t sum_w[kThreads];
  __shared__ acc_t sum_b[kThreads];
  const int tid = threadIdx.x;
  const int per_block = kThreads / split;  // cells
  const int group = tid / per_block, j = tid - group * per_block;
  // C * K < 2^31 (checked at the launch): 32-bit cell arithmetic, no 64-bit division routine
  // (whose call took a stack frame).
  const uint32_t e = blockIdx.x * static_cast<uint32_t>(per_block) + static_cast<uint32_t>(j);
  const uint32_t width = static_cast<uint32_t>(K);
  const bool live = e < static_cast<uint32_t>(C * K);
  const uint32_t c32 = live ? e / width : 0;
  const int64_t c = c32, k = live ? e - c32 * width : 0;
  acc_t acc = 0, bias = 0;
  if (live) {
    // Not unrolled: an unrolled loop's trip count is a 64-bit division by split (a called
    // routine, which took a stack frame on sm_80).
#pragma unroll 1
    for (int64_t n = group; n < N; n += split) {
      const acc_t g = gl[n * C + c];
      acc += g * mean[n * K + k];
      bias += g;
      if (index[n] == c) {
        const acc_t* pk = part + (n * K + k) * S;
        acc_t t = 0;
        for (int64_t q = 0; q < S; ++q) t += pk[q];
        acc += t;
      }
    }
  }
  sum_w[tid] = acc;
  sum_b[tid] = bias;
  __syncthreads();
  if (group == 0 && live) {
    acc_t total = 0, total_bias = 0;
    for (int h = 0; h < split; ++h) {
      total += sum_w[h * per_block + j];
      total_bias += sum_b[h * per_block + j];
    }
    gw[e] = total;
    if (k == 0) gb[c] = total_bias;
  }
}

// cas_gather_rows_kernel's split: the smallest power of two (at most 32, and not past N) that
// gives the launch two blocks an SM.
int gather_split(int64_t cells, int64_t N, int64_t sms) {
  int split = 1;
  while (split < 32 && split < N && (cells * split + kThreads - 1) / kThreads < 2 * sms) split *= 2;
  return split;
}

// Many classes: grad_weight[c, k] = sum over the samples n, in order, of grad_logits[n, c] *
// mean[n, k], plus t[n, k] (the sum of grad_out * x over channel k of sample n, from its S
// partials in order) where index[n] == c; grad_bias[c] = the sum of grad_logits[:, c]. The gather
// kernel's cost grows with classes x channels x samples (each cell walks every sample, a chain
// of L2 round trips: 88 us for 1000 classes x 2048 channels x 32 samples on an H200, after a
// cuBLAS GEMM of 25 us for the logits path); here a block owns a 64 x 64 tile of grad_weight,
// stages kStage samples at a time (their grad_logits and mean columns, loaded coalesced and all
// at once) in shared memory and accumulates a 4 x 4 sub-tile a thread from there, so the loads
// are independent, and the FMAs run from registers. A sample's t is loaded only by the tiles of
// its label's row (the labels of the stage are staged too), so the partials are read once per
// channel tile. t is added to the label's row only (selected, not multiplied by a 0/1 mask, so
// an inf in another class's sample cannot turn into a NaN). The blocks of channel tile 0 also
// sum grad_bias. Deterministic: every sum runs over the samples in order.
template <typename acc_t>
struct alignas(4 * sizeof(acc_t)) Quad {
  acc_t v[4];
};

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) cas_weight_grad_kernel(
    acc_t* __restrict__ gw, acc_t* __restrict__ gb, const acc_t* __restrict__ gl,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ part,
    const int64_t* __restrict__ index, int64_t N, int64_t K, int64_t C, int64_t S,
    int64_t k_tiles) {
  // Samples staged at a time: 32 in float32, 16 in float64 (24 KiB of tiles either way).
  constexpr int kStage = 128 / sizeof(acc_t);
  __shared__ Quad<acc_t> sg[kStage][kTileC / 4];
  __shared__ Quad<acc_t> sm[kStage][kTileK / 4];
  __shared__ Quad<acc_t> st[kStage][kTileK / 4];
  __shared__ int srow[kStage];  // the label's row in this tile, or -1
  const int tid = threadIdx.x;
  const int tr = tid / (kTileK / 4), tc = tid % (kTileK / 4);
  const int64_t c0 = int64_t(blockIdx.x / k_tiles) * kTileC;
  const int64_t k0 = int64_t(blockIdx.x % k_tiles) * kTileK;
  const bool bias_tile = blockIdx.x % k_tiles == 0;
  acc_t acc[4][4] = {};
  acc_t bias = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kStage) {
    const int count = static_cast<int>(std::min<int64_t>(kStage, N - n0));
    __syncthreads();  // the previous stage is consumed
    if (tid < kStage) {
      int row = -1;
      if (tid < count) {
        const int64_t label = index[n0 + tid];
        if (label >= c0 && label < c0 + kTileC) row = static_cast<int>(label - c0);
      }
      srow[tid] = row;
    }
    acc_t* g_flat = &sg[0][0].v[0];
    acc_t* m_flat = &sm[0][0].v[0];
    for (int e = tid; e < kStage * kTileC; e += kThreads) {
      const int s = e / kTileC, j = e % kTileC;
      const int64_t n = n0 + s;
      g_flat[e] = s < count && c0 + j < C ? gl[n * C + c0 + j] : acc_t(0);
      m_flat[e] = s < count && k0 + j < K ? mean[n * K + k0 + j] : acc_t(0);
    }
    __syncthreads();
    acc_t* t_flat = &st[0][0].v[0];
    for (int e = tid; e < kStage * kTileK; e += kThreads) {
      const int s = e / kTileK, j = e % kTileK;
      acc_t t = 0;
      if (s < count && srow[s] >= 0 && k0 + j < K) {
        const acc_t* pk = part + ((n0 + s) * K + k0 + j) * S;
        for (int64_t q = 0; q < S; ++q) t += pk[q];
      }
      t_flat[e] = t;
    }
    __syncthreads();
    for (int s = 0; s < count; ++s) {
      const Quad<acc_t> g = sg[s][tr], m = sm[s][tc];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += g.v[i] * m.v[j];
      const int row = srow[s];  // uniform over the block
      if (row >= 0 && row / 4 == tr) {
        const Quad<acc_t> t = st[s][tc];
        // Selects with constant indices (a branch per row let the compiler index acc at run
        // time, which put it in local memory).
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = row % 4 == i ? acc[i][j] + t.v[j] : acc[i][j];
      }
      if (bias_tile && tid < kTileC) bias += g_flat[s * kTileC + tid];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c0 + 4 * tr + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + 4 * tc + j;
      if (c < C && k < K) gw[c * K + k] = acc[i][j];
    }
  }
  if (bias_tile && tid < kTileC && c0 + tid < C) gb[c0 + tid] = bias;
}

// The shape of a streaming launch (see the layout notes at the top).
struct StreamShape {
  bool cl = false, vec = false;
  unsigned items = 0, tiles = 0, ctiles = 1, S = 1;
  int shift = 0;
};

int log2_ceil(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// tensors: the streamed (N, K, L) tensors (x, out, and grad_out in backward).
StreamShape stream_shape(std::initializer_list<const at::Tensor*> tensors, int64_t V, int U) {
  const at::Tensor& x = **tensors.begin();
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2);
  // The kernels index within a sample's row or channel vector in 32 bits.
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "cas (cuda): at most 2^31 - 1 spatial "
              "positions, got ", L);
  StreamShape sh;
  sh.cl = L > 1;
  for (const at::Tensor* t : tensors) sh.cl = sh.cl && t->stride(1) == 1;
  const int inner = sh.cl ? 1 : 2, outer = sh.cl ? 2 : 1;
  sh.vec = V > 1 && (sh.cl ? K : L) % V == 0;
  for (const at::Tensor* t : tensors) {
    sh.vec = sh.vec && t->stride(inner) == 1 && t->stride(outer) % V == 0 &&
             (N == 1 || t->stride(0) % V == 0) && aligned16(t->const_data_ptr());
  }
  // Rows take V elements a lane either way (16-byte packs, or V scalar loads, see
  // cas_rows_kernel); channels_last vectors only with 16-byte packs.
  const int64_t v = sh.vec || !sh.cl ? V : 1;
  int64_t tiles = 0;
  if (sh.cl) {
    const int64_t cvs = (K + v - 1) / v;
    sh.shift = std::min(6, log2_ceil(cvs));
    const int64_t tx = int64_t{1} << sh.shift, rows = (kThreads / tx) * U;
    sh.S = static_cast<unsigned>((L + rows - 1) / rows);
    sh.ctiles = static_cast<unsigned>((cvs + tx - 1) / tx);
    sh.items = static_cast<unsigned>(cvs);
    tiles = static_cast<int64_t>(sh.ctiles) * sh.S;
  } else {
    sh.shift = std::min(5, log2_ceil((L + v - 1) / v));
    const int64_t chunk = (int64_t{1} << sh.shift) * v;
    const int64_t S = (L + chunk - 1) / chunk;
    TORCH_CHECK(K * S < (int64_t{1} << 31), "cas (cuda): too many channels per sample");
    sh.S = static_cast<unsigned>(S);
    sh.items = static_cast<unsigned>(K * S);
    const int64_t per_block = (kThreads >> sh.shift) * U;
    tiles = (K * S + per_block - 1) / per_block;
  }
  TORCH_CHECK(N * tiles <= std::numeric_limits<int32_t>::max(),
              "cas (cuda): the input is too large for one launch");
  sh.tiles = static_cast<unsigned>(tiles);
  return sh;
}

template <typename scalar_t, int M>
void launch_stream(StreamParams<scalar_t> p, const StreamShape& sh, int64_t N,
                   cudaStream_t stream) {
  constexpr int V = 16 / sizeof(scalar_t);
  p.items = sh.items, p.tiles = sh.tiles, p.ctiles = sh.ctiles, p.S = sh.S, p.shift = sh.shift;
  const unsigned blocks = static_cast<unsigned>(N * sh.tiles);
  if (sh.cl) {
    if (sh.vec) {
      cas_cl_kernel<scalar_t, V, M><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      cas_cl_kernel<scalar_t, 1, M><<<blocks, kThreads, 0, stream>>>(p);
    }
  } else {
    if (sh.vec) {
      cas_rows_kernel<scalar_t, V, M, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      cas_rows_kernel<scalar_t, V, M, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kTrain, int R>
void launch_logits_rows(const LogitsParams<scalar_t>& p, int64_t groups, cudaStream_t stream) {
  using acc_t = typename CasAcc<scalar_t>::type;
  const size_t smem = static_cast<size_t>(R) * p.K * sizeof(acc_t);
  auto kernel = cas_logits_kernel<scalar_t, kTrain, R>;
  if (smem > 48 * 1024) {
    const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem + 1024 <= limit, "cas (cuda): ", p.K, " channels need ", smem,
                " bytes of shared memory, more than the device's ", limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(groups * p.cb), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The logits launch: R samples a block with many classes (see kLogitsWideSamples).
template <typename scalar_t, bool kTrain>
void launch_logits(const LogitsParams<scalar_t>& p, int R, cudaStream_t stream) {
  const int64_t groups = (p.N + R - 1) / R;
  if (R == 1) {
    launch_logits_rows<scalar_t, kTrain, 1>(p, groups, stream);
  } else {
    launch_logits_rows<scalar_t, kTrain, kLogitsWideSamples>(p, groups, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cas_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& label) {
  check_cas_args(x, weight, bias, label);
  TORCH_CHECK(x.is_cuda(), "cas (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2), C = weight.size(0);
  const at::ScalarType acc = cas_acc_dtype(x.scalar_type());
  at::Tensor out = at::empty_like(x);
  at::Tensor logits = at::empty({N, C}, x.options());
  at::Tensor index = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({N, K}, x.options().dtype(acc));
  if (N == 0) return {out, logits, index, mean};
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "cas (cuda): at most 2^31 - 1 samples");
  // The kernels read label[n] and bias[c] at unit stride.
  const at::Tensor labels = label ? label->contiguous() : at::Tensor();
  const at::Tensor biases = bias ? bias->contiguous() : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_cuda", [&] {
    using acc_t = typename CasAcc<scalar_t>::type;
    constexpr int V = 16 / sizeof(scalar_t);
    const StreamShape sh = stream_shape({&x, &out}, V, Slots<kTrain, scalar_t>::value);
    at::Tensor part = at::empty({N, K, static_cast<int64_t>(sh.S)}, mean.options());
    StreamParams<scalar_t> sp{};
    sp.x = x.const_data_ptr<scalar_t>();
    sp.out = out.mutable_data_ptr<scalar_t>();
    sp.w = weight.const_data_ptr<scalar_t>();
    sp.sel = label ? labels.const_data_ptr<int64_t>() : index.const_data_ptr<int64_t>();
    sp.part = part.mutable_data_ptr<acc_t>();
    sp.K = K, sp.L = L, sp.C = C;
    sp.xs0 = x.stride(0), sp.xs1 = x.stride(1), sp.xs2 = x.stride(2);
    sp.os0 = out.stride(0), sp.os1 = out.stride(1), sp.os2 = out.stride(2);
    sp.ws0 = weight.stride(0), sp.ws1 = weight.stride(1);

    LogitsParams<scalar_t> lp{};
    lp.part = sp.part;
    lp.w = sp.w;
    lp.b = bias ? biases.const_data_ptr<scalar_t>() : nullptr;
    lp.label = label ? labels.const_data_ptr<int64_t>() : nullptr;
    lp.logits = logits.mutable_data_ptr<scalar_t>();
    lp.index = index.mutable_data_ptr<int64_t>();
    lp.mean = mean.mutable_data_ptr<acc_t>();
    lp.N = N, lp.K = K, lp.L = L, lp.C = C, lp.S = sh.S, lp.ws0 = sp.ws0, lp.ws1 = sp.ws1;
    // One block per sample unless there are many classes: then R samples a block (while their
    // means fit the default 48 KiB of shared memory), and the classes split over blocks while
    // that leaves the GPU idle.
    // With many classes and logits in the accumulation type (float32, float64), the kernel
    // stores the means only (cpb = 0) and a GEMM forms the logits from them.
    const bool gemm = C > kLogitsWideClasses && std::is_same_v<scalar_t, acc_t>;
    const bool wide = !gemm && C > kLogitsWideClasses &&
                      kLogitsWideSamples * K * static_cast<int64_t>(sizeof(acc_t)) <= 48 * 1024;
    const int R = wide ? kLogitsWideSamples : 1;
    const int64_t groups = (N + R - 1) / R;
    int64_t cb = 1;
    if (gemm) {
      lp.cpb = 0;
    } else {
      if (C > kLogitsWideClasses && groups < kLogitsFillBlocks) {
        cb = std::min((C + kWarps - 1) / kWarps, (kLogitsFillBlocks + groups - 1) / groups);
      }
      lp.cpb = (C + cb - 1) / cb;
      cb = (C + lp.cpb - 1) / lp.cpb;
    }
    TORCH_CHECK(groups * cb <= std::numeric_limits<int32_t>::max(), "cas (cuda): too many samples");
    lp.cb = static_cast<unsigned>(cb);
    const auto logits_gemm = [&] {
      const at::Tensor wt = weight.t();
      if (bias) {
        at::addmm_out(logits, biases, mean, wt);
      } else {
        at::mm_out(logits, mean, wt);
      }
    };

    if (label) {
      launch_stream<scalar_t, kTrain>(sp, sh, N, stream);
      launch_logits<scalar_t, true>(lp, R, stream);
      if (gemm) logits_gemm();
    } else {
      launch_stream<scalar_t, kSum>(sp, sh, N, stream);
      launch_logits<scalar_t, false>(lp, R, stream);
      if (gemm) logits_gemm();
      if (cb > 1 || R > 1 || gemm) {
        cas_argmax_kernel<scalar_t><<<static_cast<unsigned>((N + kWarps - 1) / kWarps), kThreads,
                                      0, stream>>>(lp.logits, lp.index, N, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      launch_stream<scalar_t, kWrite>(sp, sh, N, stream);
    }
  });
  return {out, logits, index, mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cas_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_logits, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& index, const at::Tensor& mean) {
  check_cas_backward_args(grad_out, grad_logits, x, weight, index, mean);
  TORCH_CHECK(x.is_cuda(), "cas backward (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2), C = weight.size(0);
  const at::ScalarType acc = cas_acc_dtype(x.scalar_type());
  const at::Tensor idx = index.contiguous();
  const at::Tensor gl = grad_logits.to(acc).contiguous();
  // The logits' gradient reaches every element of a channel as (grad_logits @ weight) / L (the
  // streaming kernel divides).
  const at::Tensor a = at::mm(gl, weight.to(acc)).contiguous();
  at::Tensor gx = at::empty_like(x);
  if (N == 0) {
    return {gx, at::zeros_like(weight), at::zeros({C}, weight.options())};
  }
  // grad_weight = grad_logits.T @ mean (the logits path) + the sums of grad_out * x of each
  // class's samples, and grad_bias, from the gather kernel below; with more classes than
  // kGatherLogitsClasses the logits path is a GEMM first.
  const bool gather_logits = C <= kGatherLogitsClasses;
  at::Tensor gw = at::empty({C, K}, a.options());
  at::Tensor gb = at::empty({C}, a.options());
  const at::Tensor mean_acc = mean.to(acc).contiguous();
  {
    TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "cas (cuda): at most 2^31 - 1 samples");
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_backward_cuda", [&] {
      using acc_t = typename CasAcc<scalar_t>::type;
      constexpr int V = 16 / sizeof(scalar_t);
      const StreamShape sh = stream_shape({&x, &gx, &grad_out}, V, Slots<kBwd, scalar_t>::value);
      at::Tensor part = at::empty({N, K, static_cast<int64_t>(sh.S)}, a.options());
      StreamParams<scalar_t> p{};
      p.g = grad_out.const_data_ptr<scalar_t>();
      p.x = x.const_data_ptr<scalar_t>();
      p.out = gx.mutable_data_ptr<scalar_t>();
      p.w = weight.const_data_ptr<scalar_t>();
      p.sel = idx.const_data_ptr<int64_t>();
      p.a = a.const_data_ptr<acc_t>();
      p.part = part.mutable_data_ptr<acc_t>();
      p.K = K, p.L = L, p.C = C;
      p.gs0 = grad_out.stride(0), p.gs1 = grad_out.stride(1), p.gs2 = grad_out.stride(2);
      p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
      p.os0 = gx.stride(0), p.os1 = gx.stride(1), p.os2 = gx.stride(2);
      p.ws0 = weight.stride(0), p.ws1 = weight.stride(1);
      launch_stream<scalar_t, kBwd>(p, sh, N, stream);
      const int64_t cells = C * K;
      TORCH_CHECK(cells <= std::numeric_limits<int32_t>::max(),
                  "cas backward (cuda): weight too large (at most 2^31 - 1 elements)");
      if (gather_logits) {
        const int split =
            gather_split(cells, N, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
        const int64_t per_block = kThreads / split;
        cas_gather_rows_kernel<acc_t>
            <<<static_cast<unsigned>((cells + per_block - 1) / per_block), kThreads, 0, stream>>>(
                gw.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>(),
                gl.const_data_ptr<acc_t>(), mean_acc.const_data_ptr<acc_t>(),
                part.const_data_ptr<acc_t>(), idx.const_data_ptr<int64_t>(), N, K, C,
                static_cast<int64_t>(sh.S), split);
      } else {
        const int64_t k_tiles = (K + kTileK - 1) / kTileK;
        const int64_t tiles = (C + kTileC - 1) / kTileC * k_tiles;  // C * K < 2^31: fits
        cas_weight_grad_kernel<acc_t><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
            gw.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(),
            mean_acc.const_data_ptr<acc_t>(), part.const_data_ptr<acc_t>(),
            idx.const_data_ptr<int64_t>(), N, K, C, static_cast<int64_t>(sh.S), k_tiles);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gx, gw.to(weight.scalar_type()), gb.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("cas", &cas_cuda);
  m.impl("_cas_backward", &cas_backward_cuda);
}

}  // namespace pyprune
