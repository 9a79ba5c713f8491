// Stochastic activation pruning pieces shared by the CPU and CUDA kernels: the keep probability
// and argument checks. Randomness: csrc/random.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "random.h"

namespace pyprune {

// q = 1 - (1 - p)^r, computed as -expm1(r * log1p(-p)): the naive form loses every digit once
// p is below float epsilon, which it is for most elements of a realistic activation.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sap_keep_probability(acc_t p, int64_t r) {
#if defined(__CUDA_ARCH__)
  return -expm1(static_cast<acc_t>(r) * log1p(-p));
#else
  return -std::expm1(static_cast<acc_t>(r) * std::log1p(-p));
#endif
}

// float q = -expm1(y) on y in [-1/2, 0] (csrc/cpu/fast_math.h, csrc/cuda/sap.cu,
// triton_kernels/sap.py): -y e(y) with e(y) = expm1(y) / y = 1 + C1 y + ... + C5 y^5, the
// degree-5 minimax polynomial of relative error 1.5e-9 there (below float rounding: q within
// ~1.2 ulp, as the degree-7 Taylor polynomial of e, two multiply-adds longer).
constexpr float kExpm1C1 = 4.99999851e-1f;
constexpr float kExpm1C2 = 1.66662887e-1f;
constexpr float kExpm1C3 = 4.16320488e-2f;
constexpr float kExpm1C4 = 8.19329452e-3f;
constexpr float kExpm1C5 = 1.12592161e-3f;

// p = |x| / total overflows or loses digits where the total is tiny: 1 / total exceeds the
// largest acc_t, and in exact mode S_r / total the largest double (CPU) or total / S_r drops below
// the smallest normal acc_t (CUDA). Such a total and every |x| are multiplied by this power of two
// first: exact, since each |x| <= total is far from overflow, and p is unchanged.
template <typename acc_t>
C10_HOST_DEVICE inline double sap_tiny_total_scale(double total) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return total < 0x1p-896 ? 0x1p128 : 1.0;
  } else {
    return total < 0x1p-64 ? 0x1p64 : 1.0;
  }
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& x, const char* op) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.numel() == 2, op,
              ": seed must be an int64 tensor of shape (2,), got ", seed.scalar_type(), " ",
              seed.sizes());
  TORCH_CHECK(seed.device() == x.device() || seed.is_cpu(), op, ": seed must be on x's device ",
              x.device(), " or the CPU, got ", seed.device());
}

// The seed of a GPU launch: read on the device, or by value from a seed tensor on the host
// (read here: host memory, no sync).
inline SeedArg seed_arg(const at::Tensor& seed, const at::Tensor& x) {
  if (seed.is_cpu() && !x.is_cpu()) {
    const int64_t* s = seed.const_data_ptr<int64_t>();
    return {nullptr, 0, static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[seed.stride(0)])};
  }
  return {seed.const_data_ptr<int64_t>(), seed.stride(0), 0, 0};
}

inline void check_sap_args(const at::Tensor& x, const at::Tensor& seed, int64_t r) {
  TORCH_CHECK(x.dim() == 2, "sap: x must be a 2-D (N, L) view, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sap: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(r >= 1, "sap: the number of draws r must be >= 1, got ", r);
  check_seed(seed, x, "sap");
}

inline void check_sap_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& seed, int64_t r) {
  check_sap_args(x, seed, r);
  TORCH_CHECK(grad.sizes() == x.sizes(), "sap backward: grad must have shape ", x.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "sap backward: grad must have x's dtype ", x.scalar_type(), " and device ",
              x.device());
}

inline void check_noise_args(const at::Tensor& x, const at::Tensor& seed, double std) {
  TORCH_CHECK(x.dim() == 1, "gaussian_noise: x must be a 1-D view, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "gaussian_noise: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(std >= 0.0, "gaussian_noise: std must be >= 0, got ", std);
  check_seed(seed, x, "gaussian_noise");
}

}  // namespace pyprune
