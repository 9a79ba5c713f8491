// CAS pieces shared by the CPU and CUDA kernels: the accumulation type, the argmax order, and
// argument checks (the kernels check their own arguments, for direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

namespace pyprune {

// Channel sums, logits and gradients accumulate in float (double for double inputs).
template <typename scalar_t>
struct CasAcc {
  using type = float;
};
template <>
struct CasAcc<double> {
  using type = double;
};

inline at::ScalarType cas_acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether (v, i) beats (best, best_i) in torch.argmax's order: NaN is largest, and the first
// index wins ties (so also among NaNs).
template <typename acc_t>
C10_HOST_DEVICE inline bool argmax_better(acc_t v, int64_t i, acc_t best, int64_t best_i) {
  const bool v_nan = v != v, b_nan = best != best;
  if (v_nan || b_nan) return v_nan && (!b_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

inline void check_cas_args(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& label) {
  TORCH_CHECK(x.dim() == 3, "cas: x must be a 3-D (N, K, H*W) view, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "cas: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1,
              "cas: x must have at least one channel and one spatial element, got shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) >= 1,
              "cas: weight must have shape (num_classes >= 1, ", x.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cas: weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "cas: weight must be on x's device ", x.device(),
              ", got ", weight.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "cas: bias must have shape (", weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "cas: bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "cas: bias must be on x's device ", x.device());
  }
  if (label) {
    TORCH_CHECK(label->dim() == 1 && label->size(0) == x.size(0), "cas: label must have shape (",
                x.size(0), "), got ", label->sizes());
    TORCH_CHECK(label->scalar_type() == at::kLong, "cas: label must be int64, got ",
                label->scalar_type());
    TORCH_CHECK(label->device() == x.device(), "cas: label must be on x's device ", x.device());
  }
}

inline void check_cas_backward_args(const at::Tensor& grad_out, const at::Tensor& grad_logits,
                                    const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& index, const at::Tensor& mean) {
  check_cas_args(x, weight, std::nullopt, index);
  const int64_t N = x.size(0), K = x.size(1), C = weight.size(0);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device() == x.device(),
              "cas backward: grad_out must match x (shape ", x.sizes(), ", ", x.scalar_type(),
              "), got ", grad_out.sizes(), ", ", grad_out.scalar_type());
  TORCH_CHECK(grad_logits.dim() == 2 && grad_logits.size(0) == N && grad_logits.size(1) == C &&
                  grad_logits.scalar_type() == x.scalar_type() &&
                  grad_logits.device() == x.device(),
              "cas backward: grad_logits must have shape (", N, ", ", C, ") and x's dtype, got ",
              grad_logits.sizes(), ", ", grad_logits.scalar_type());
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == N && mean.size(1) == K &&
                  mean.scalar_type() == cas_acc_dtype(x.scalar_type()) &&
                  mean.device() == x.device(),
              "cas backward: mean must have shape (", N, ", ", K, ") and dtype ",
              cas_acc_dtype(x.scalar_type()), ", got ", mean.sizes(), ", ", mean.scalar_type());
}

}  // namespace pyprune
