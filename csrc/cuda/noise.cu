// Gaussian noise on CUDA: one elementwise launch; each thread takes whole Philox evaluations
// (four consecutive values, two Box-Muller pairs) and writes x + std * n or x * (1 + std * n).
// The seed is read from device memory: no host sync, CUDA-graph safe.
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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    noise_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                 const int64_t* __restrict__ seed_ptr, int64_t numel, int64_t sx, int64_t so,
                 float std, bool multiplicative) {
  using acc_t = at::opmath_type<scalar_t>;
  const Seed seed{static_cast<uint64_t>(seed_ptr[0]), static_cast<uint64_t>(seed_ptr[1])};
  const int64_t evaluations = (numel + 3) / 4;
  for (int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x; b < evaluations;
       b += int64_t(gridDim.x) * kThreads) {
    const Philox4 w = philox(seed.key, static_cast<uint64_t>(b), seed.stream);
    float n[4];
    to_normal_pair(w.w[0], w.w[1], n[0], n[1]);
    to_normal_pair(w.w[2], w.w[3], n[2], n[3]);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {  // no break: constant lanes keep n[] in registers
      const int64_t i = 4 * b + lane;
      if (i < numel) {
        const acc_t v = static_cast<acc_t>(x[i * sx]);
        const acc_t e = static_cast<acc_t>(std) * static_cast<acc_t>(n[lane]);
        out[i * so] = static_cast<scalar_t>(multiplicative ? v * (acc_t(1) + e) : v + e);
      }
    }
  }
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
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((evaluations + kThreads - 1) / kThreads, int64_t(sms) * 16));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_cuda", [&] {
    noise_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        seed.const_data_ptr<int64_t>(), x.numel(), x.stride(0), out.stride(0),
        static_cast<float>(std), multiplicative);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("gaussian_noise", &gaussian_noise_cuda);
}

}  // namespace pyprune
