// Stochastic activation pruning on CUDA: one block per sample, one launch (the seed is read from
// device memory, so the launch is CUDA-graph safe). The algorithm is csrc/cpu/sap.cpp's:
//
// * sum |x| over the sample, tile by tile with block scans (accumulated exactly as the merge
//   below accumulates its prefix sums, so the last draw stays below the last prefix);
// * bernoulli: each thread takes whole Philox evaluations (four consecutive elements) and keeps
//   element j when u_j < q_j;
// * exact: the sum of the r + 1 exponential spacings, then a merge tile by tile: the tile's
//   inclusive prefix sums of |x| go to shared memory, a chunk of blockDim draws is scanned into
//   sorted positions S_i * sum|x| / S_r, and each draw inside the tile binary-searches its
//   element and flags it. A chunk that runs past the tile is taken again with the next tile.
//   Spacings are regenerated from the seed, never stored.
// A tiny total (sap_tiny_total_scale) and every |x| are scaled by a power of two first.
// Kept elements are written as src / q (src = x forward, grad backward), the rest as src * 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "../random.h"
#include "../sap.h"

namespace pyprune {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct SapParams {
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ src;
  scalar_t* __restrict__ out;
  const int64_t* __restrict__ seed;
  int64_t N, L, r;
  int64_t xs0, xs1, ss0, ss1, os0, os1;
};

// Register budgets as blocks per SM: the bernoulli pass fits 32 registers (64 in float64), full
// occupancy; the exact draws get 85, where ptxas left to itself spills float64's to reach 64.
template <typename scalar_t, bool kExact>
constexpr int min_blocks() {
  return kExact ? 3 : (sizeof(scalar_t) == 8 ? 4 : 8);
}

template <typename scalar_t, bool kExact>
__global__ void __launch_bounds__(kThreads, (min_blocks<scalar_t, kExact>()))
    sap_kernel(const SapParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using BlockScan = cub::BlockScan<acc_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ acc_t tile_c[kThreads];
  __shared__ int flag[kThreads];
  __shared__ acc_t last[2];

  const int tid = threadIdx.x;
  const Seed seed{static_cast<uint64_t>(p.seed[0]), static_cast<uint64_t>(p.seed[1])};
  const int64_t L = p.L, r = p.r;

  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const scalar_t* x = p.x + n * p.xs0;
    const scalar_t* src = p.src + n * p.ss0;
    scalar_t* out = p.out + n * p.os0;
    acc_t pre = 1;  // sap_tiny_total_scale, once the total is known
    auto abs_x = [&](int64_t j) {
      const acc_t v = j < L ? static_cast<acc_t>(x[j * p.xs1]) : acc_t(0);
      return (v < acc_t(0) ? -v : v) * pre;
    };
    auto kept_value = [&](int64_t j, acc_t a, acc_t total) {
      const acc_t q = sap_keep_probability<acc_t>(a / total, r);
      return static_cast<scalar_t>(static_cast<acc_t>(src[j * p.ss1]) / q);
    };

    acc_t total = 0;
    for (int64_t t0 = 0; t0 < L; t0 += kThreads) {
      acc_t c, tile;
      BlockScan(scan).InclusiveSum(abs_x(t0 + tid), c, tile);
      __syncthreads();
      total += tile;
    }
    // Nothing is drawn from an all-zero sample or one with a NaN or inf (p undefined), nor from
    // one whose sum overflows (the reference's p = |x| / inf = 0).
    const bool drawable = total > acc_t(0) && total < INFINITY;
    pre = static_cast<acc_t>(sap_tiny_total_scale<acc_t>(total));
    total *= pre;

    if constexpr (!kExact) {
      const uint64_t begin = static_cast<uint64_t>(n) * L, end = begin + L;
      for (uint64_t b = (begin >> 2) + tid; 4 * b < end; b += kThreads) {
        const Philox4 w = philox(seed.key, b, seed.stream);
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          const uint64_t i = 4 * b + lane;
          if (i < begin || i >= end) continue;
          const int64_t j = static_cast<int64_t>(i - begin);
          const acc_t a = abs_x(j);
          const acc_t q = sap_keep_probability<acc_t>(a / total, r);
          const bool kept = drawable && static_cast<acc_t>(to_uniform(w.w[lane])) < q;
          const acc_t g = static_cast<acc_t>(src[j * p.ss1]);
          out[j * p.os1] = static_cast<scalar_t>(kept ? g / q : g * acc_t(0));
        }
      }
      continue;
    }

    const uint64_t base = static_cast<uint64_t>(n) * static_cast<uint64_t>(r + 1);
    auto spacing = [&](int64_t d) {
      const uint64_t i = base + d;
      return static_cast<acc_t>(to_exponential(philox(seed.key, i >> 2, seed.stream).w[i & 3]));
    };
    acc_t spacings = 0;
    for (int64_t d0 = 0; d0 <= r; d0 += kThreads) {
      const int64_t d = d0 + tid;
      acc_t s, chunk;
      BlockScan(scan).InclusiveSum(d <= r ? spacing(d) : acc_t(0), s, chunk);
      __syncthreads();
      spacings += chunk;
    }
    const acc_t scale = total / spacings;  // draw i sits at S_i * scale in the units of C

    acc_t carry_c = 0, carry_s = 0;
    int64_t first = 0;  // first draw not yet merged into an earlier tile
    for (int64_t t0 = 0; t0 < L; t0 += kThreads) {
      const int64_t j = t0 + tid;
      const int count = static_cast<int>(std::min<int64_t>(kThreads, L - t0));
      const acc_t a = abs_x(j);
      acc_t c, tile;
      BlockScan(scan).InclusiveSum(a, c, tile);
      tile_c[tid] = c + carry_c;
      flag[tid] = 0;
      __syncthreads();
      const acc_t tile_hi = tile_c[count - 1];
      while (first < r && drawable) {
        const int64_t d = first + tid;
        const bool valid = d < r;
        acc_t s, chunk;
        BlockScan(scan).InclusiveSum(valid ? spacing(d) : acc_t(0), s, chunk);
        s += carry_s;
        const acc_t v = s * scale;
        if (valid && v >= carry_c && v < tile_hi) {
          int lo = 0, hi = count;  // first element whose prefix exceeds v
          while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (tile_c[mid] <= v) lo = mid + 1; else hi = mid;
          }
          flag[lo] = 1;
        }
        if (d == std::min<int64_t>(first + kThreads, r) - 1) {
          last[0] = v;
          last[1] = s;
        }
        __syncthreads();
        const bool consumed = last[0] < tile_hi;
        if (consumed) {
          first += kThreads;
          carry_s = last[1];
        }
        __syncthreads();
        if (!consumed) break;
      }
      if (j < L) {
        out[j * p.os1] = flag[tid] ? kept_value(j, a, total)
                                   : static_cast<scalar_t>(static_cast<acc_t>(src[j * p.ss1]) * acc_t(0));
      }
      carry_c = tile_hi;
      __syncthreads();
    }
  }
}

at::Tensor sap_cuda_common(const at::Tensor& src, const at::Tensor& x, const at::Tensor& seed,
                           int64_t r, bool exact) {
  TORCH_CHECK(x.is_cuda(), "sap (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(src);
  if (x.numel() == 0) return out;
  const int64_t N = x.size(0);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(N, 65535));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sap_cuda", [&] {
    SapParams<scalar_t> p{x.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(), seed.const_data_ptr<int64_t>(),
                          N, x.size(1), r, x.stride(0), x.stride(1), src.stride(0),
                          src.stride(1), out.stride(0), out.stride(1)};
    if (exact) {
      sap_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      sap_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(p);
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
