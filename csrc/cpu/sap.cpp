// Stochastic activation pruning on the CPU, one sample per task (at::parallel_for over samples).
//
// Both modes first sum |x| over the sample (in double, in element order), then
//  * bernoulli (exact=False): one pass keeps element j when u_j < q_j (u_j: value n*L + j of the
//    call's Philox stream, csrc/random.h);
//  * exact: the r draws are r sorted uniforms U_(i) = S_i / S_r (S = prefix sums of r + 1
//    Exp(1) spacings, values n*(r+1) + i of the stream) scaled by sum|x|, merged in one pass with
//    the prefix sum C of |x|: element j is drawn iff some U_(i) * sum|x| lies in [C_{j-1}, C_j).
//    This is inverse-CDF sampling of r draws with replacement from p = |x| / sum|x|, without
//    a sort and without an index tensor; the r + 1 spacings live in a per-thread buffer.
// Values are handled in tiles of 64: Philox, q and the writes vectorize (csrc/cpu/fast_math.h).
// Kept elements are written as src / q (src = x forward, grad backward), the rest as 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../random.h"
#include "../sap.h"
#include "fast_math.h"

namespace pyprune {
namespace {

constexpr int kTile = 64;  // elements (or draws) per vectorized step

inline float keep_probability(float p, float r) { return fast_keep_probability(p, r); }
inline double keep_probability(double p, double r) {
  return sap_keep_probability<double>(p, static_cast<int64_t>(r));
}

template <typename scalar_t>
struct Rows {
  const scalar_t* x;
  const scalar_t* src;
  scalar_t* out;
  int64_t xs0, xs1, ss0, ss1, os0, os1;
};

template <typename scalar_t>
void sap_cpu_impl(const Rows<scalar_t>& t, int64_t N, int64_t L, Seed seed, int64_t r,
                  bool exact) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> spacing(exact ? r + 1 : 0);
    uint32_t bits[kTile];
    acc_t q[kTile];
    bool kept[kTile];
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* x = t.x + n * t.xs0;
      const scalar_t* src = t.src + n * t.ss0;
      scalar_t* out = t.out + n * t.os0;
      auto abs_x = [&](int64_t j) { return std::abs(static_cast<double>(x[j * t.xs1])); };
      double total = 0;
      for (int64_t j = 0; j < L; ++j) total += abs_x(j);
      if (!(total > 0)) {  // an all-zero sample: nothing can be drawn
        for (int64_t j = 0; j < L; ++j) out[j * t.os1] = scalar_t(0);
        continue;
      }
      const acc_t inv_total = static_cast<acc_t>(1.0 / total);
      const acc_t r_acc = static_cast<acc_t>(r);
      // q of elements j0 .. j0 + count - 1, then their outputs from kept[].
      auto tile_q = [&](int64_t j0, int count) {
        for (int k = 0; k < count; ++k)
          q[k] = keep_probability(static_cast<acc_t>(std::abs(static_cast<acc_t>(x[(j0 + k) * t.xs1]))) * inv_total, r_acc);
      };
      auto tile_write = [&](int64_t j0, int count) {
        for (int k = 0; k < count; ++k) {
          const acc_t v = static_cast<acc_t>(src[(j0 + k) * t.ss1]) / q[k];
          out[(j0 + k) * t.os1] = kept[k] ? static_cast<scalar_t>(v) : scalar_t(0);
        }
      };
      if (!exact) {
        const uint64_t base = static_cast<uint64_t>(n) * L;
        for (int64_t j0 = 0; j0 < L; j0 += kTile) {
          const int count = static_cast<int>(std::min<int64_t>(kTile, L - j0));
          stream_bits(seed, base + j0, count, bits);
          tile_q(j0, count);
          for (int k = 0; k < count; ++k) kept[k] = static_cast<acc_t>(to_uniform(bits[k])) < q[k];
          tile_write(j0, count);
        }
        continue;
      }
      // Exact: the r + 1 spacings and their sum.
      const uint64_t base = static_cast<uint64_t>(n) * static_cast<uint64_t>(r + 1);
      double spacings = 0;
      for (int64_t d0 = 0; d0 <= r; d0 += kTile) {
        const int count = static_cast<int>(std::min<int64_t>(kTile, r + 1 - d0));
        stream_bits(seed, base + d0, count, bits);
        float* e = spacing.data() + d0;
        for (int k = 0; k < count; ++k) e[k] = -fast_log(1.0f - to_uniform(bits[k]));
        for (int k = 0; k < count; ++k) spacings += e[k];
      }
      // Merge: draw d sits at S_d * total / S_r, in the units of C.
      const double scale = total / spacings;
      int64_t d = 0;
      double s = spacing[0];
      double next = s * scale;
      double c = 0;
      for (int64_t j0 = 0; j0 < L; j0 += kTile) {
        const int count = static_cast<int>(std::min<int64_t>(kTile, L - j0));
        for (int k = 0; k < count; ++k) {
          c += abs_x(j0 + k);
          kept[k] = d < r && next < c;
          while (d < r && next < c) {
            s += spacing[++d];
            next = s * scale;
          }
        }
        tile_q(j0, count);
        tile_write(j0, count);
      }
    }
  });
}

at::Tensor sap_cpu_common(const at::Tensor& src, const at::Tensor& x, const at::Tensor& seed,
                          int64_t r, bool exact) {
  TORCH_CHECK(x.device().is_cpu(), "sap (cpu): x must be a CPU tensor, got ", x.device());
  at::Tensor out = at::empty_like(src);
  if (x.numel() == 0) return out;
  const int64_t* sp = seed.const_data_ptr<int64_t>();
  const Seed s{static_cast<uint64_t>(sp[0]), static_cast<uint64_t>(sp[seed.stride(0)])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sap_cpu", [&] {
    const Rows<scalar_t> t{x.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                           src.stride(0), src.stride(1), out.stride(0), out.stride(1)};
    sap_cpu_impl<scalar_t>(t, x.size(0), x.size(1), s, r, exact);
  });
  return out;
}

at::Tensor sap_cpu(const at::Tensor& x, const at::Tensor& seed, int64_t r, bool exact) {
  check_sap_args(x, seed, r);
  return sap_cpu_common(x, x, seed, r, exact);
}

at::Tensor sap_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& seed,
                            int64_t r, bool exact) {
  check_sap_backward_args(grad, x, seed, r);
  return sap_cpu_common(grad, x, seed, r, exact);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("sap", &sap_cpu);
  m.impl("_sap_backward", &sap_backward_cpu);
}

}  // namespace pyprune
