// Gaussian noise on the CPU in one pass: each task takes whole Philox evaluations (four values)
// and writes x + std * n or x * (1 + std * n); no noise tensor is materialized.
//
// Box-Muller runs on blocks of evaluations with branch-free float approximations of log, sin
// and cos (relative error ~1e-7) that the compiler vectorizes; libm's scalar calls would take
// most of the time. The uniforms are csrc/random.h's, so the stream is the CUDA and Triton
// kernels' up to those last-bit differences.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../random.h"
#include "fast_math.h"
#include "../sap.h"
#include "isa.h"

PYPRUNE_ISA_BEGIN
#include "philox.h"

namespace {

constexpr int kBlock = kPhiloxBlock;  // Philox evaluations per vectorized step

template <typename scalar_t>
void noise_cpu_impl(const at::Tensor& x, Seed seed, double std, bool multiplicative,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t numel = x.numel(), sx = x.stride(0), so = out.stride(0);
  const acc_t sd = static_cast<acc_t>(std);
  at::parallel_for(0, (numel + 3) / 4, 2048, [&](int64_t b0, int64_t b1) {
    // Evaluation t gives value 4t + 2h + {0, 1} = radius(lane 2h) * (cos, sin)(angle(lane 2h + 1)).
    uint32_t words[4][kBlock];
    alignas(64) float n[4 * kBlock];
    for (int64_t blk = b0; blk < b1; blk += kBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kBlock, b1 - blk));
      philox_lanes(seed, static_cast<uint64_t>(blk), count, words);
      for (int h = 0; h < 2; ++h) {
        alignas(64) float cs[kBlock], sn[kBlock], radius[kBlock];
        for (int t = 0; t < count; ++t) {
          radius[t] = std::sqrt(-2.0f * fast_log(1.0f - to_uniform(words[2 * h][t])));
          fast_sincos_turns(to_uniform(words[2 * h + 1][t]), sn[t], cs[t]);
        }
        for (int t = 0; t < count; ++t) {
          n[4 * t + 2 * h] = radius[t] * cs[t];
          n[4 * t + 2 * h + 1] = radius[t] * sn[t];
        }
      }
      const int64_t i0 = 4 * blk, values = std::min<int64_t>(4 * count, numel - i0);
      const scalar_t* xb = xp + i0 * sx;
      scalar_t* ob = op + i0 * so;
      auto apply = [&](auto unit) {
        constexpr bool kUnit = decltype(unit)::value;
        for (int64_t i = 0; i < values; ++i) {
          const acc_t v = static_cast<acc_t>(xb[kUnit ? i : i * sx]);
          const acc_t e = sd * static_cast<acc_t>(n[i]);
          ob[kUnit ? i : i * so] = static_cast<scalar_t>(multiplicative ? v * (acc_t(1) + e) : v + e);
        }
      };
      if (sx == 1 && so == 1) {
        apply(std::true_type{});
      } else {
        apply(std::false_type{});
      }
    }
  });
}

}  // namespace

void gaussian_noise_kernel(const at::Tensor& x, Seed seed, double std, bool multiplicative,
                           at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_cpu", [&] {
    noise_cpu_impl<scalar_t>(x, seed, std, multiplicative, out);
  });
}
PYPRUNE_ISA_END

#ifndef PYPRUNE_CPU_AVX2
PYPRUNE_CPU_DECLARE(void, gaussian_noise_kernel, const at::Tensor&, Seed, double, bool, at::Tensor&)

namespace pyprune {
namespace {

at::Tensor gaussian_noise_cpu(const at::Tensor& x, const at::Tensor& seed, double std,
                              bool multiplicative) {
  check_noise_args(x, seed, std);
  TORCH_CHECK(x.device().is_cpu(), "gaussian_noise (cpu): x must be a CPU tensor, got ",
              x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t* sp = seed.const_data_ptr<int64_t>();
  const Seed s{static_cast<uint64_t>(sp[0]), static_cast<uint64_t>(sp[seed.stride(0)])};
  PYPRUNE_CPU_KERNEL(gaussian_noise_kernel, x, s, std, multiplicative, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("gaussian_noise", &gaussian_noise_cpu);
}

}  // namespace pyprune
#endif  // PYPRUNE_CPU_AVX2
