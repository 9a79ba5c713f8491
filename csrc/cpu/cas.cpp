// CAS on the CPU, parallel over samples. Training (label given): one pass over a sample sums
// each channel and writes out = x * weight[label] together; the logits are one GEMM over the
// batch's means. Inference: a first pass sums the channels, the logits and their argmax follow
// from the means, and a second pass scales the sample, which the first pass has just brought
// into cache (or, for a large classifier, a GEMM between the two passes: cas_cpu_impl).
// Backward: one pass over x and grad_out per sample writes grad_x and the channel sums of
// grad_out * x.
//
// Three layouts of the (N, K, L) view get unit-stride inner loops: rows of a channel contiguous
// (NCHW), channels contiguous at each position (channels_last), and anything else.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cas.h"
#include "isa.h"

PYPRUNE_ISA_BEGIN
namespace {

constexpr int kUnroll = 8;  // independent partial sums, so the reductions vectorize

// Strides of a sample of an (N, K, L) tensor.
struct Strides {
  int64_t k, l;
};

enum class Layout { kRows, kChannelsLast, kStrided };

Layout layout_of(std::initializer_list<const at::Tensor*> ts) {
  bool rows = true, last = true;
  for (const at::Tensor* t : ts) {
    rows &= t->stride(2) == 1;
    last &= t->stride(1) == 1;
  }
  return rows ? Layout::kRows : last ? Layout::kChannelsLast : Layout::kStrided;
}

// Calls f(std::integral_constant<int, kL>) with kL = L for the common spatial sizes (1x1, 2x2,
// 3x3, 4x4, 7x7, 8x8), else kL = 0 (L at run time): with the row length known, the short row
// loops of late CNN stages unroll instead of paying a loop and a remainder per channel.
template <typename F>
void with_row_length(int64_t L, F&& f) {
  switch (L) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 9: return f(std::integral_constant<int, 9>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 49: return f(std::integral_constant<int, 49>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Eight floats as one value: the short fixed-length rows below are written with it, since the
// compiler fully unrolls them into scalar code otherwise. Same arithmetic, same order, as the
// kUnroll partial sums of the generic loops.
using Float8 = float __attribute__((vector_size(32)));
inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, Float8 v) { std::memcpy(p, &v, sizeof(v)); }
inline float sum8(Float8 part) {
  float s = 0;
  for (int j = 0; j < 8; ++j) s += part[j];
  return s;
}
template <int kL, typename scalar_t>
constexpr bool kVectorRows = std::is_same_v<scalar_t, float> && kL > 0 && kL % kUnroll == 0;

// Rows layout of sum_channels: row k of x at x + k * xk, unit stride.
template <int kL, bool kWrite, typename scalar_t, typename acc_t>
void sum_rows(const scalar_t* x, int64_t xk, scalar_t* o, int64_t ok, const acc_t* m, int64_t K,
              int64_t L_run, acc_t* sum) {
  if constexpr (kVectorRows<kL, scalar_t>) {
    for (int64_t k = 0; k < K; ++k) {
      const float* xr = x + k * xk;
      float* orow = o + k * ok;
      Float8 part = {};
      for (int l = 0; l < kL; l += 8) {
        const Float8 v = load8(xr + l);
        part += v;
        if constexpr (kWrite) store8(orow + l, v * m[k]);
      }
      sum[k] = sum8(part);
    }
    return;
  }
  const int64_t L = kL > 0 ? kL : L_run;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* xr = x + k * xk;
    scalar_t* orow = o + k * ok;
    const acc_t mk = kWrite ? m[k] : acc_t(0);
    acc_t part[kUnroll] = {};
    int64_t l = 0;
    for (; l + kUnroll <= L; l += kUnroll) {
      for (int j = 0; j < kUnroll; ++j) {
        const acc_t v = static_cast<acc_t>(xr[l + j]);
        part[j] += v;
        if constexpr (kWrite) orow[l + j] = static_cast<scalar_t>(v * mk);
      }
    }
    acc_t s = 0;
    for (; l < L; ++l) {
      const acc_t v = static_cast<acc_t>(xr[l]);
      s += v;
      if constexpr (kWrite) orow[l] = static_cast<scalar_t>(v * mk);
    }
    for (int j = 0; j < kUnroll; ++j) s += part[j];
    sum[k] = s;
  }
}

// sum[k] = sum_l x[k, l]; with kWrite also o[k, l] = x[k, l] * m[k] (in x's dtype, exactly as
// eager multiplies: the product of two values of x's dtype is exact in acc_t).
template <bool kWrite, typename scalar_t, typename acc_t>
void sum_channels(Layout layout, const scalar_t* x, Strides xs, scalar_t* o, Strides os,
                  const acc_t* m, int64_t K, int64_t L, acc_t* sum) {
  if (layout == Layout::kRows) {
    with_row_length(L, [&](auto kL) {
      sum_rows<decltype(kL)::value, kWrite>(x, xs.k, o, os.k, m, K, L, sum);
    });
    return;
  }
  std::fill(sum, sum + K, acc_t(0));
  if (layout == Layout::kChannelsLast) {
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* xr = x + l * xs.l;
      scalar_t* orow = o + l * os.l;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = static_cast<acc_t>(xr[k]);
        sum[k] += v;
        if constexpr (kWrite) orow[k] = static_cast<scalar_t>(v * m[k]);
      }
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int64_t l = 0; l < L; ++l) {
      const acc_t v = static_cast<acc_t>(x[k * xs.k + l * xs.l]);
      s += v;
      if constexpr (kWrite) o[k * os.k + l * os.l] = static_cast<scalar_t>(v * m[k]);
    }
    sum[k] = s;
  }
}

// o[k, l] = x[k, l] * m[k].
template <typename scalar_t, typename acc_t>
void scale_channels(Layout layout, const scalar_t* x, Strides xs, scalar_t* o, Strides os,
                    const acc_t* m, int64_t K, int64_t L) {
  if (layout == Layout::kChannelsLast) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t k = 0; k < K; ++k)
        o[l * os.l + k] = static_cast<scalar_t>(static_cast<acc_t>(x[l * xs.l + k]) * m[k]);
    return;
  }
  const int64_t xl = layout == Layout::kRows ? 1 : xs.l, ol = layout == Layout::kRows ? 1 : os.l;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* xr = x + k * xs.k;
    scalar_t* orow = o + k * os.k;
    const acc_t mk = m[k];
    if (layout == Layout::kRows) {
      for (int64_t l = 0; l < L; ++l) orow[l] = static_cast<scalar_t>(static_cast<acc_t>(xr[l]) * mk);
    } else {
      for (int64_t l = 0; l < L; ++l)
        orow[l * ol] = static_cast<scalar_t>(static_cast<acc_t>(xr[l * xl]) * mk);
    }
  }
}

// Samples per parallel task: about 64 K elements of work each.
int64_t sample_grain(int64_t per_sample) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(per_sample, 1));
}

// Writes one sample's logits rounded to x's dtype and returns their argmax, taken over the
// logits as returned.
template <typename scalar_t, typename acc_t>
int64_t logits_argmax(const acc_t* lg, int64_t C, scalar_t* logp) {
  int64_t best = 0;
  acc_t best_v = 0;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t r = static_cast<scalar_t>(lg[c]);
    logp[c] = r;
    const acc_t v = static_cast<acc_t>(r);
    if (c == 0 || argmax_better(v, c, best_v, best)) best_v = v, best = c;
  }
  return best;
}

// Training: one pass per sample sums the channels and writes out = x * weight[label]; the logits
// follow as one GEMM over the batch's means. Inference: the logits pick each sample's scale
// row, so they come before the scaling: per sample from the means while the sample is in cache
// when the classifier is small next to the sample (C < L / 4 and C * K <= 64 K), otherwise
// one GEMM between a summing pass and a scaling pass.
template <typename scalar_t>
void cas_cpu_impl(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& label, bool train,
                  at::Tensor& out, at::Tensor& logits, at::Tensor& index, at::Tensor& mean) {
  using acc_t = typename CasAcc<scalar_t>::type;
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2), C = weight.size(0);
  const at::ScalarType acc = cas_acc_dtype(x.scalar_type());
  const at::Tensor w = weight.to(acc).contiguous();  // rows are the channel scales
  const at::Tensor b = bias ? bias->to(acc).contiguous() : at::zeros({C}, w.options());
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const int64_t* lp = train ? label.const_data_ptr<int64_t>() : nullptr;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* logp = logits.mutable_data_ptr<scalar_t>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  const Strides xs{x.stride(1), x.stride(2)}, os{out.stride(1), out.stride(2)};
  const Layout layout = layout_of({&x, &out});
  const acc_t inv_l = acc_t(1) / acc_t(L);
  const int64_t grain = sample_grain(K * L);
  auto means = [&](int64_t n, const acc_t* sum) {
    for (int64_t k = 0; k < K; ++k) mp[n * K + k] = sum[k] * inv_l;
  };

  if (train || 4 * C >= L || C * K > 65536) {
    // Summing pass (training also writes out), then the logits as one GEMM.
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> sum(K);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* xn = xp + n * x.stride(0);
        if (train) {
          sum_channels<true>(layout, xn, xs, op + n * out.stride(0), os, wp + lp[n] * K, K, L,
                             sum.data());
          ip[n] = lp[n];
        } else {
          sum_channels<false>(layout, xn, xs, op, os, wp, K, L, sum.data());
        }
        means(n, sum.data());
      }
    });
    const at::Tensor lg = at::addmm(b, mean, w.t());
    if (train) {
      logits.copy_(lg);
      return;
    }
    const acc_t* lgp = lg.const_data_ptr<acc_t>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        ip[n] = logits_argmax(lgp + n * C, C, logp + n * C);
        scale_channels(layout, xp + n * x.stride(0), xs, op + n * out.stride(0), os,
                       wp + ip[n] * K, K, L);
      }
    });
    return;
  }
  const at::Tensor wt = w.t().contiguous();  // (K, C): logits accumulate as axpys
  const acc_t* wtp = wt.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> sum(K), lg(C);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* xn = xp + n * x.stride(0);
      sum_channels<false>(layout, xn, xs, op, os, wp, K, L, sum.data());
      means(n, sum.data());
      std::copy_n(bp, C, lg.data());
      for (int64_t k = 0; k < K; ++k) {
        const acc_t m = mp[n * K + k];
        const acc_t* wr = wtp + k * C;
        for (int64_t c = 0; c < C; ++c) lg[c] += wr[c] * m;
      }
      ip[n] = logits_argmax(lg.data(), C, logp + n * C);
      scale_channels(layout, xn, xs, op + n * out.stride(0), os, wp + ip[n] * K, K, L);
    }
  });
}

// Rows layout of backward_sample.
template <int kL, typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* g, int64_t gk, const scalar_t* x, int64_t xk, scalar_t* gx,
                   int64_t ok, const acc_t* m, const acc_t* a, int64_t K, int64_t L_run, acc_t* t) {
  if constexpr (kVectorRows<kL, scalar_t>) {
    for (int64_t k = 0; k < K; ++k) {
      const float* gr = g + k * gk;
      const float* xr = x + k * xk;
      float* orow = gx + k * ok;
      Float8 part = {};
      for (int l = 0; l < kL; l += 8) {
        const Float8 gv = load8(gr + l);
        part += gv * load8(xr + l);
        store8(orow + l, gv * m[k] + a[k]);
      }
      t[k] = sum8(part);
    }
    return;
  }
  const int64_t L = kL > 0 ? kL : L_run;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* gr = g + k * gk;
    const scalar_t* xr = x + k * xk;
    scalar_t* orow = gx + k * ok;
    const acc_t mk = m[k], ak = a[k];
    acc_t part[kUnroll] = {};
    int64_t l = 0;
    for (; l + kUnroll <= L; l += kUnroll) {
      for (int j = 0; j < kUnroll; ++j) {
        const acc_t gv = static_cast<acc_t>(gr[l + j]);
        part[j] += gv * static_cast<acc_t>(xr[l + j]);
        orow[l + j] = static_cast<scalar_t>(gv * mk + ak);
      }
    }
    acc_t s = 0;
    for (; l < L; ++l) {
      const acc_t gv = static_cast<acc_t>(gr[l]);
      s += gv * static_cast<acc_t>(xr[l]);
      orow[l] = static_cast<scalar_t>(gv * mk + ak);
    }
    for (int j = 0; j < kUnroll; ++j) s += part[j];
    t[k] = s;
  }
}

// grad_x[k, l] = g[k, l] * m[k] + a[k] and t[k] = sum_l g[k, l] * x[k, l], for one sample.
template <typename scalar_t, typename acc_t>
void backward_sample(Layout layout, const scalar_t* g, Strides gs, const scalar_t* x, Strides xs,
                     scalar_t* gx, Strides os, const acc_t* m, const acc_t* a, int64_t K,
                     int64_t L, acc_t* t) {
  if (layout == Layout::kRows) {
    with_row_length(L, [&](auto kL) {
      backward_rows<decltype(kL)::value>(g, gs.k, x, xs.k, gx, os.k, m, a, K, L, t);
    });
    return;
  }
  std::fill(t, t + K, acc_t(0));
  if (layout == Layout::kChannelsLast) {
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* gr = g + l * gs.l;
      const scalar_t* xr = x + l * xs.l;
      scalar_t* orow = gx + l * os.l;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t gv = static_cast<acc_t>(gr[k]);
        t[k] += gv * static_cast<acc_t>(xr[k]);
        orow[k] = static_cast<scalar_t>(gv * m[k] + a[k]);
      }
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int64_t l = 0; l < L; ++l) {
      const acc_t gv = static_cast<acc_t>(g[k * gs.k + l * gs.l]);
      s += gv * static_cast<acc_t>(x[k * xs.k + l * xs.l]);
      gx[k * os.k + l * os.l] = static_cast<scalar_t>(gv * m[k] + a[k]);
    }
    t[k] = s;
  }
}

}  // namespace

void cas_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& labels, bool train, at::Tensor& out, at::Tensor& logits,
                at::Tensor& index, at::Tensor& mean) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_cpu", [&] {
    cas_cpu_impl<scalar_t>(x, weight, bias, labels, train, out, logits, index, mean);
  });
}

// grad_x and t (N, K) = per-sample channel sums of grad_out * x; w: weight in the accumulation
// dtype, a: (grad_logits @ w) / L.
void cas_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& a, const at::Tensor& idx, at::Tensor& gx, at::Tensor& t) {
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2);
  const Layout layout = layout_of({&grad_out, &x, &gx});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_backward_cpu", [&] {
    using acc_t = typename CasAcc<scalar_t>::type;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    acc_t* tp = t.mutable_data_ptr<acc_t>();
    const Strides gs{grad_out.stride(1), grad_out.stride(2)}, xs{x.stride(1), x.stride(2)},
        os{gx.stride(1), gx.stride(2)};
    at::parallel_for(0, N, sample_grain(2 * K * L), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        backward_sample(layout, gp + n * grad_out.stride(0), gs, xp + n * x.stride(0), xs,
                        op + n * gx.stride(0), os, wp + ip[n] * K, ap + n * K, K, L, tp + n * K);
      }
    });
  });
}
PYPRUNE_ISA_END

#ifndef PYPRUNE_CPU_AVX2
PYPRUNE_CPU_DECLARE(void, cas_kernel, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, const at::Tensor&, bool, at::Tensor&,
                    at::Tensor&, at::Tensor&, at::Tensor&)
PYPRUNE_CPU_DECLARE(void, cas_backward_kernel, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                    at::Tensor&)

namespace pyprune {
namespace {

void check_labels(const at::Tensor& label, int64_t C) {
  const int64_t* lp = label.data_ptr<int64_t>();
  for (int64_t n = 0; n < label.numel(); ++n)
    TORCH_CHECK_VALUE(lp[n] >= 0 && lp[n] < C, "cas: label values must be in [0, ", C,
                      "), got ", lp[n], " at position ", n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cas_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& label) {
  check_cas_args(x, weight, bias, label);
  TORCH_CHECK(x.device().is_cpu(), "cas (cpu): x must be a CPU tensor, got ", x.device());
  const int64_t N = x.size(0), K = x.size(1), C = weight.size(0);
  const at::Tensor labels = label ? label->contiguous() : at::Tensor();
  if (label) check_labels(labels, C);
  at::Tensor out = at::empty_like(x);
  at::Tensor logits = at::empty({N, C}, x.options());
  at::Tensor index = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({N, K}, x.options().dtype(cas_acc_dtype(x.scalar_type())));
  if (N == 0) return {out, logits, index, mean};
  PYPRUNE_CPU_KERNEL(cas_kernel, x, weight, bias, labels, label.has_value(), out, logits, index,
                     mean);
  return {out, logits, index, mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cas_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_logits, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& index, const at::Tensor& mean) {
  check_cas_backward_args(grad_out, grad_logits, x, weight, index, mean);
  TORCH_CHECK(x.device().is_cpu(), "cas backward (cpu): x must be a CPU tensor, got ", x.device());
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2);
  const at::ScalarType acc = cas_acc_dtype(x.scalar_type());
  const at::Tensor idx = index.contiguous();
  check_labels(idx, weight.size(0));
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor gl = grad_logits.to(acc);
  // The logits' gradient reaches every element of a channel as (grad_logits @ weight) / L.
  const at::Tensor a = at::mm(gl, w).div_(L).contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor t = at::empty({N, K}, w.options());
  if (N > 0) PYPRUNE_CPU_KERNEL(cas_backward_kernel, grad_out, x, w, a, idx, gx, t);
  // grad_weight = grad_logits.T @ mean (the logits path) + t scatter-added into the chosen rows.
  at::Tensor gw = at::mm(gl.t(), mean);
  gw.index_add_(0, idx, t);
  return {gx, gw.to(weight.scalar_type()), gl.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("cas", &cas_cpu);
  m.impl("_cas_backward", &cas_backward_cpu);
}

}  // namespace pyprune
#endif  // PYPRUNE_CPU_AVX2
