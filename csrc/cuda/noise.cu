// Gaussian noise on CUDA: one elementwise launch, out = x + std * n or x * (1 + std * n).
//
// Each thread takes whole Philox evaluations (four consecutive values, two Box-Muller pairs:
// csrc/random.h's stream), kUnroll of them per loop trip, and issues every load of the trip
// before it computes and stores. Where x and out are contiguous and aligned to four elements,
// an evaluation's four values move as one vector (16 bytes for float, 8 for half / bfloat16);
// otherwise, and for a partial last evaluation, element by element at the tensors' strides.
//
// Box-Muller runs on the hardware's approximate transcendentals (lg2.approx, sqrt.approx,
// sin.approx / cos.approx on 2 pi u in [0, 2 pi)): absolute error ~1e-6 in n, far below what the
// distribution tests resolve; the CPU and Triton kernels give the same n to that accuracy.
//
// Bytes: one pass, numel * sizeof(scalar_t) read + numel * sizeof(scalar_t) written, plus the
// 16-byte seed per thread (cached). The seed is read from device memory, or passed by value
// when its tensor is on the host (an eager call's: SeedArg): no host sync, CUDA-graph safe.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../random.h"
#include "../sap.h"

namespace pyprune {
namespace {

constexpr int kThreads = 256;

// Loop trips unrolled per thread: 32 bytes of x in flight per thread for every dtype.
template <typename scalar_t>
constexpr int unroll() {
  return sizeof(scalar_t) >= 4 ? 2 : 4;
}

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Quad {
  scalar_t v[4];
};

// The two normals of words (b0, b1), as to_normal_pair but on the approximate units.
__device__ __forceinline__ void fast_normal_pair(uint32_t b0, uint32_t b1, float& n0, float& n1) {
  constexpr float kMinusTwoLn2 = -1.3862943611198906f;  // -2 ln 2: -2 ln v = -2 ln 2 log2 v
  const float y = kMinusTwoLn2 * __log2f(1.0f - to_uniform(b0));  // >= 0
  float radius;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(radius) : "f"(y));
  float sin_t, cos_t;
  __sincosf(6.283185307179586f * to_uniform(b1), &sin_t, &cos_t);
  n0 = radius * cos_t;
  n1 = radius * sin_t;
}

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    noise_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                 SeedArg seed_arg, int64_t numel, int64_t sx, int64_t so,
                 float std, bool multiplicative) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = unroll<scalar_t>();
  const Seed seed = seed_arg.load();
  const int64_t evaluations = (numel + 3) / 4;
  const int64_t full = numel / 4;  // evaluations whose four values all exist
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t b0 = int64_t(blockIdx.x) * kThreads + threadIdx.x; b0 < evaluations;
       b0 += step * kUnroll) {
    Quad<scalar_t> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = b0 + u * step;
      if (kVec && b < full) {
        v[u] = reinterpret_cast<const Quad<scalar_t>*>(x)[b];
      } else {
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t i = 4 * b + lane;
          v[u].v[lane] = i < numel ? x[i * sx] : scalar_t(0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = b0 + u * step;
      if (b >= evaluations) break;
      const Philox4 w = philox(seed.key, static_cast<uint64_t>(b), seed.stream);
      float n[4];
      fast_normal_pair(w.w[0], w.w[1], n[0], n[1]);
      fast_normal_pair(w.w[2], w.w[3], n[2], n[3]);
      Quad<scalar_t> y;
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const acc_t xv = static_cast<acc_t>(v[u].v[lane]);
        const acc_t e = static_cast<acc_t>(std) * static_cast<acc_t>(n[lane]);
        y.v[lane] = static_cast<scalar_t>(multiplicative ? xv * (acc_t(1) + e) : xv + e);
      }
      if (kVec && b < full) {
        reinterpret_cast<Quad<scalar_t>*>(out)[b] = y;
      } else {
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {  // no break: constant lanes keep y in registers
          const int64_t i = 4 * b + lane;
          if (i < numel) out[i * so] = y.v[lane];
        }
      }
    }
  }
}

template <typename scalar_t>
bool quad_aligned(const at::Tensor& t) {
  return t.stride(0) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % sizeof(Quad<scalar_t>) == 0;
}

at::Tensor gaussian_noise_cuda(const at::Tensor& x, const at::Tensor& seed, double std,
                               bool multiplicative) {
  check_noise_args(x, seed, std);
  TORCH_CHECK(x.is_cuda(), "gaussian_noise (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t evaluations = (x.numel() + 3) / 4;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_cuda", [&] {
    const int64_t per_block = int64_t(kThreads) * unroll<scalar_t>();
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((evaluations + per_block - 1) / per_block, int64_t(sms) * 16));
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          seed_arg(seed, x), x.numel(), x.stride(0), out.stride(0),
          static_cast<float>(std), multiplicative);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (quad_aligned<scalar_t>(x) && quad_aligned<scalar_t>(out)) {
      launch(noise_kernel<scalar_t, true>);
    } else {
      launch(noise_kernel<scalar_t, false>);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("gaussian_noise", &gaussian_noise_cuda);
}

}  // namespace pyprune
