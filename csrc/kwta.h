// k-WTA pieces shared by the CPU and CUDA kernels: the order-preserving key map, the keep
// predicate, and argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cstdint>

namespace pyprune {

// Selection runs on unsigned keys whose order is the float order of the values (or of their
// absolute values), with every NaN mapped to the largest key, as torch.topk ranks NaN.
// Half types are ranked through float, which preserves their order exactly.
template <typename scalar_t>
struct KeyTraits {
  using acc_t = float;
  using key_t = uint32_t;
};
template <>
struct KeyTraits<double> {
  using acc_t = double;
  using key_t = uint64_t;
};

template <typename acc_t, typename U>
C10_HOST_DEVICE inline U to_key(acc_t v, bool absolute) {
  static_assert(sizeof(acc_t) == sizeof(U), "key and value widths differ");
  constexpr int bits_minus_1 = sizeof(U) * 8 - 1;
  constexpr U sign = U(1) << bits_minus_1;
  // The bits of +inf: all exponent bits set. A larger magnitude is a NaN.
  constexpr U inf = sizeof(U) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bits = c10::bit_cast<U>(v);
  const U magnitude = bits & ~sign;
  if (absolute) bits = magnitude;
  // Integer selects only, so loops over keys vectorize: negative values flip every bit,
  // positive ones set the sign bit; -0 and +0 tie (as for >=); NaN is the largest key.
  U key = bits ^ ((U(0) - (bits >> bits_minus_1)) | sign);
  key = magnitude == 0 ? sign : key;
  return magnitude > inf ? ~U(0) : key;
}

// Inverse of to_key; the NaN key maps back to a NaN.
template <typename acc_t, typename U>
C10_HOST_DEVICE inline acc_t from_key(U key) {
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  return c10::bit_cast<acc_t>((key & sign) ? (key & ~sign) : ~key);
}

// The reference's mask: key(v) >= threshold, with NaN always kept (the same as comparing keys).
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline bool keep(scalar_t value, acc_t threshold, bool absolute) {
  acc_t v = static_cast<acc_t>(value);
  v = (absolute && v < acc_t(0)) ? -v : v;
  return (v >= threshold) | (v != v);
}

inline void check_kwta_args(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 3, "kwta: x must be a 3-D (N, C, L) group view, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "kwta: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(k >= 1 && k <= x.size(2), "kwta: k must be in [1, ", x.size(2), "], got ", k);
}

inline void check_kwta_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& threshold) {
  TORCH_CHECK(x.dim() == 3, "kwta backward: x must be 3-D (N, C, L), got shape ", x.sizes());
  TORCH_CHECK(grad.sizes() == x.sizes(), "kwta backward: grad must have shape ", x.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(threshold.dim() == 2 && threshold.size(0) == x.size(0) &&
                  threshold.size(1) == x.size(1),
              "kwta backward: threshold must have shape (", x.size(0), ", ", x.size(1), "), got ",
              threshold.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && threshold.scalar_type() == x.scalar_type(),
              "kwta backward: grad, x and threshold must share x's dtype ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device() && threshold.device() == x.device(),
              "kwta backward: grad, x and threshold must be on x's device ", x.device());
}

}  // namespace pyprune
