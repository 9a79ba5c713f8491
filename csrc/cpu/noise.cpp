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

namespace pyprune {
namespace {

constexpr int kBlock = 64;  // Philox evaluations per vectorized Box-Muller step

template <typename scalar_t>
void noise_cpu_impl(const at::Tensor& x, Seed seed, double std, bool multiplicative,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t numel = x.numel(), sx = x.stride(0), so = out.stride(0);
  const acc_t sd = static_cast<acc_t>(std);
  at::parallel_for(0, (numel + 3) / 4, 2048, [&](int64_t b0, int64_t b1) {
    // u[pair][t]: the pair's radius uniform (lane 0 / 2) and angle uniform (lane 1 / 3).
    alignas(64) float radius_u[2 * kBlock], angle_u[2 * kBlock], n[4 * kBlock];
    for (int64_t blk = b0; blk < b1; blk += kBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kBlock, b1 - blk));
      for (int t = 0; t < count; ++t) {
        const Philox4 w = philox(seed.key, static_cast<uint64_t>(blk + t), seed.stream);
        radius_u[2 * t] = to_uniform(w.w[0]);
        angle_u[2 * t] = to_uniform(w.w[1]);
        radius_u[2 * t + 1] = to_uniform(w.w[2]);
        angle_u[2 * t + 1] = to_uniform(w.w[3]);
      }
      for (int t = 0; t < 2 * count; ++t) {
        const float radius = std::sqrt(-2.0f * fast_log(1.0f - radius_u[t]));
        float sn, cs;
        fast_sincos_turns(angle_u[t], sn, cs);
        n[2 * t] = radius * cs;
        n[2 * t + 1] = radius * sn;
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

at::Tensor gaussian_noise_cpu(const at::Tensor& x, const at::Tensor& seed, double std,
                              bool multiplicative) {
  check_noise_args(x, seed, std);
  TORCH_CHECK(x.device().is_cpu(), "gaussian_noise (cpu): x must be a CPU tensor, got ",
              x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t* sp = seed.const_data_ptr<int64_t>();
  const Seed s{static_cast<uint64_t>(sp[0]), static_cast<uint64_t>(sp[seed.stride(0)])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_cpu", [&] {
    noise_cpu_impl<scalar_t>(x, s, std, multiplicative, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("gaussian_noise", &gaussian_noise_cpu);
}

}  // namespace pyprune
