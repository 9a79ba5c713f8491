// k-WTA on the CPU: per-group k-th largest key by radix select (quickselect for small groups),
// fused with the masked write. Parallel over groups, or within a group when groups are few.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kwta.h"

namespace pyprune {
namespace {

constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;
// Below this group size a quickselect over a key copy beats clearing radix histograms.
constexpr int64_t kSmallGroup = 1024;
// A group is split across threads only when it is this large.
constexpr int64_t kSplitGroup = 1 << 15;

// Strided view of one group: element i lives at base[i * stride].
template <typename scalar_t>
struct Group {
  const scalar_t* base;
  int64_t stride;
  int64_t size;
  scalar_t operator[](int64_t i) const { return base[i * stride]; }
};

// Picks the digit holding the k-th largest key (k is 1-based from the top, updated to the
// rank within that digit's bucket).
inline int pick_digit(const int64_t* hist, int bins, int64_t& k) {
  int64_t above = 0;
  for (int d = bins - 1; d > 0; --d) {
    if (above + hist[d] >= k) {
      k -= above;
      return d;
    }
    above += hist[d];
  }
  k -= above;
  return 0;
}

// Radix select over a group split into `chunks` contiguous ranges processed in parallel (when
// not already inside a parallel region). buf holds group.size keys and hist chunks * kBins.
template <typename scalar_t, typename U>
U radix_select(const Group<scalar_t>& g, int64_t k, bool absolute, int64_t chunks, U* buf,
               int64_t* hist, int64_t* fill) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  constexpr int total_bits = sizeof(U) * 8;
  const int64_t per_chunk = (g.size + chunks - 1) / chunks;
  auto key_at = [&](int64_t i) { return to_key<acc_t, U>(static_cast<acc_t>(g[i]), absolute); };
  auto reduce = [&](int bins) {
    for (int64_t c = 1; c < chunks; ++c)
      for (int b = 0; b < bins; ++b) hist[b] += hist[c * kBins + b];
  };

  // Pass 1: histogram of the top digit over the whole group.
  int shift = total_bits - kRadixBits;
  std::fill(hist, hist + chunks * kBins, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist + c * kBins;
      const int64_t end = std::min(g.size, (c + 1) * per_chunk);
      for (int64_t i = c * per_chunk; i < end; ++i) ++h[key_at(i) >> shift];
    }
  });
  reduce(kBins);
  U prefix = U(pick_digit(hist, kBins, k)) << shift;
  U prefix_mask = U(kBins - 1) << shift;

  // Pass 2: gather the keys of that bucket (each chunk into its own range of buf) and
  // histogram the next digit.
  int next = std::max(shift - kRadixBits, 0);
  int bins = 1 << (shift - next);
  std::fill(hist, hist + chunks * kBins, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist + c * kBins;
      const int64_t begin = c * per_chunk, end = std::min(g.size, begin + per_chunk);
      int64_t m = begin;
      for (int64_t i = begin; i < end; ++i) {
        const U key = key_at(i);
        if ((key & prefix_mask) == prefix) {
          buf[m++] = key;
          ++h[(key >> next) & U(bins - 1)];
        }
      }
      fill[c] = m - begin;
    }
  });
  reduce(bins);
  int64_t count = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    std::memmove(buf + count, buf + c * per_chunk, fill[c] * sizeof(U));
    count += fill[c];
  }
  shift = next;
  prefix |= U(pick_digit(hist, bins, k)) << shift;
  prefix_mask |= U(bins - 1) << shift;

  // Remaining digits: the candidates are few; narrow them in place.
  while (shift > 0) {
    next = std::max(shift - kRadixBits, 0);
    bins = 1 << (shift - next);
    std::fill(hist, hist + bins, 0);
    int64_t m = 0;
    for (int64_t j = 0; j < count; ++j) {
      const U key = buf[j];
      if ((key & prefix_mask) == prefix) {
        buf[m++] = key;
        ++hist[(key >> next) & U(bins - 1)];
      }
    }
    count = m;
    shift = next;
    prefix |= U(pick_digit(hist, bins, k)) << shift;
    prefix_mask |= U(bins - 1) << shift;
  }
  return prefix;
}

template <typename scalar_t, typename U>
U small_select(const Group<scalar_t>& g, int64_t k, bool absolute, U* buf) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  for (int64_t i = 0; i < g.size; ++i) buf[i] = to_key<acc_t, U>(static_cast<acc_t>(g[i]), absolute);
  std::nth_element(buf, buf + (k - 1), buf + g.size, std::greater<U>());
  return buf[k - 1];
}

template <typename scalar_t>
void kwta_cpu_impl(const at::Tensor& x, int64_t k, bool absolute, at::Tensor& out,
                   at::Tensor& threshold) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  using U = typename KeyTraits<scalar_t>::key_t;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), G = N * C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* tp = threshold.mutable_data_ptr<scalar_t>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sl = x.stride(2);
  const int64_t on = out.stride(0), oc = out.stride(1), ol = out.stride(2);
  const int64_t threads = at::get_num_threads();
  // Few large groups: split each group across threads; otherwise one thread per group.
  const int64_t chunks = (G < threads && L >= kSplitGroup) ? threads : 1;

  auto run_groups = [&](int64_t g0, int64_t g1) {
    std::vector<U> buf(L);
    std::vector<int64_t> hist(L > kSmallGroup ? chunks * kBins : 0), fill(chunks);
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t n = gi / C, c = gi % C;
      const Group<scalar_t> g{xp + n * sn + c * sc, sl, L};
      const U key = L > kSmallGroup
                        ? radix_select<scalar_t, U>(g, k, absolute, chunks, buf.data(),
                                                    hist.data(), fill.data())
                        : small_select<scalar_t, U>(g, k, absolute, buf.data());
      const acc_t t = from_key<acc_t, U>(key);
      tp[gi] = static_cast<scalar_t>(t);
      scalar_t* o = op + n * on + c * oc;
      const int64_t per_chunk = (L + chunks - 1) / chunks;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        const int64_t begin = c0 * per_chunk, end = std::min(L, c1 * per_chunk);
        if (sl == 1 && ol == 1) {
          for (int64_t i = begin; i < end; ++i) o[i] = keep<acc_t>(g.base[i], t, absolute) ? g.base[i] : scalar_t(0);
        } else {
          for (int64_t i = begin; i < end; ++i) o[i * ol] = keep<acc_t>(g[i], t, absolute) ? g[i] : scalar_t(0);
        }
      });
    }
  };
  if (chunks > 1) {
    run_groups(0, G);
  } else {
    at::parallel_for(0, G, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), run_groups);
  }
}

std::tuple<at::Tensor, at::Tensor> kwta_cpu(const at::Tensor& x, int64_t k, bool absolute) {
  check_kwta_args(x, k);
  TORCH_CHECK(x.device().is_cpu(), "kwta (cpu): x must be a CPU tensor, got ", x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor threshold = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.numel() == 0) return {out, threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kwta_cpu", [&] {
    kwta_cpu_impl<scalar_t>(x, k, absolute, out, threshold);
  });
  return {out, threshold};
}

template <typename scalar_t>
void kwta_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& x,
                            const at::Tensor& threshold, bool absolute, at::Tensor& gx) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  const int64_t C = x.size(1), L = x.size(2), G = x.size(0) * C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* tp = threshold.const_data_ptr<scalar_t>();
  scalar_t* op = gx.mutable_data_ptr<scalar_t>();
  const int64_t tn = threshold.stride(0), tc = threshold.stride(1);
  // Flat index over (group, element); each range reads its own thresholds.
  at::parallel_for(0, G * L, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin / L; gi * L < end; ++gi) {
      const int64_t n = gi / C, c = gi % C;
      const acc_t t = static_cast<acc_t>(tp[n * tn + c * tc]);
      const scalar_t* xg = xp + n * x.stride(0) + c * x.stride(1);
      const scalar_t* gg = gp + n * grad.stride(0) + c * grad.stride(1);
      scalar_t* og = op + n * gx.stride(0) + c * gx.stride(1);
      const int64_t i0 = std::max(begin - gi * L, int64_t(0)), i1 = std::min(end - gi * L, L);
      const int64_t sx = x.stride(2), sg = grad.stride(2), so = gx.stride(2);
      if (sx == 1 && sg == 1 && so == 1) {
        for (int64_t i = i0; i < i1; ++i) og[i] = keep<acc_t>(xg[i], t, absolute) ? gg[i] : scalar_t(0);
      } else {
        for (int64_t i = i0; i < i1; ++i)
          og[i * so] = keep<acc_t>(xg[i * sx], t, absolute) ? gg[i * sg] : scalar_t(0);
      }
    }
  });
}

at::Tensor kwta_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                             const at::Tensor& threshold, bool absolute) {
  check_kwta_backward_args(grad, x, threshold);
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kwta_backward_cpu", [&] {
    kwta_backward_cpu_impl<scalar_t>(grad, x, threshold, absolute, gx);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("kwta", &kwta_cpu);
  m.impl("_kwta_backward", &kwta_backward_cpu);
}

}  // namespace pyprune
