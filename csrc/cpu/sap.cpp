// Stochastic activation pruning on the CPU, one sample per task (at::parallel_for over samples).
//
// Both modes first sum |x| over the sample (in double), then
//  * bernoulli (exact=False): one pass keeps element j when u_j < q_j (u_j: value n*L + j of the
//    call's Philox stream, csrc/random.h);
//  * exact: the r draws are r sorted uniforms U_(i) = S_i / S_r (S = prefix sums of r + 1
//    Exp(1) spacings, values n*(r+1) + i of the stream) scaled by sum|x|, merged with the prefix
//    sum C of |x|: element j is drawn iff some U_(i) * sum|x| lies in [C_{j-1}, C_j). This is
//    inverse-CDF sampling of r draws with replacement from p = |x| / sum|x|, without a sort and
//    without an index tensor. The prefix sums S live in a per-thread buffer of at most
//    draw_chunk() draws; beyond it r costs one double per chunk (256 KB at r = 2^31 - 1):
//     - r <= draw_chunk(): one pass fills the buffer with every S_i, and the merge runs as eight
//       independent merges over eighths of the sample (each starts at its first draw, found by
//       binary search), interleaved so that their dependency chains overlap; each advances over
//       the draws of an element without a data-dependent branch in the common case (<= 2 draws);
//     - larger r: a first pass sums the spacings for S_r (the merge needs it before any draw)
//       and keeps S at the end of each chunk; the merge then walks the same segments in order,
//       skipping every chunk that lies wholly below an element's end and regenerating (from its
//       start S, so bit for bit) only the chunks in which an element ends. For r much larger
//       than the sample the second pass costs at most one chunk per element.
//    Both merges give each element the same draws, so the outputs do not depend on the chunk.
// Values are handled in tiles of 64: Philox, q and the writes vectorize (csrc/cpu/fast_math.h).
// Kept elements are written as src / q (src = x forward, grad backward), the rest as src * 0
// (0, or NaN where src is NaN or inf, as the reference's src * scale).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../random.h"
#include "../sap.h"
#include "fast_math.h"
#include "isa.h"

#if PYPRUNE_HAVE_AVX2
#include <immintrin.h>
#endif

PYPRUNE_ISA_BEGIN
#include "philox.h"

namespace {

constexpr int kTile = 64;  // elements (or draws) per vectorized step

// Draws per exact-mode buffer: 2^16 keeps the benchmarked group sizes (r <= 65536) in the one-pass
// merge at 0.5 MB per thread. PYPRUNE_SAP_DRAW_CHUNK overrides it (rounded up to whole tiles) so
// tests can move the chunk boundaries.
int64_t draw_chunk() {
  static const int64_t chunk = [] {
    const char* env = std::getenv("PYPRUNE_SAP_DRAW_CHUNK");
    const int64_t asked = env != nullptr ? std::max<int64_t>(std::atoll(env), 1) : int64_t(1) << 16;
    return (asked + kTile - 1) / kTile * kTile;
  }();
  return chunk;
}

// q for p[0 .. count): float through fast_keep_probability, specialized for a tile of small p
// (the common case: p ~ 1 / group size); double through libm.
inline void keep_probabilities(float* p, int count, float r) {
  float largest = 0;
  for (int k = 0; k < count; ++k) largest = std::max(largest, p[k]);
  if (largest < kSmallKeepP) {
    for (int k = 0; k < count; ++k) p[k] = fast_keep_probability<true>(p[k], r);
  } else {
    for (int k = 0; k < count; ++k) p[k] = fast_keep_probability(p[k], r);
  }
}
inline void keep_probabilities(double* p, int count, double r) {
  for (int k = 0; k < count; ++k) p[k] = sap_keep_probability<double>(p[k], static_cast<int64_t>(r));
}

template <typename scalar_t>
struct Rows {
  const scalar_t* x;
  const scalar_t* src;
  scalar_t* out;
  int64_t xs0, xs1, ss0, ss1, os0, os1;
};

constexpr int kLanes = 8;  // interleaved merges in exact mode

// Elements [first, second) of segment s of a sample of L elements, in exact mode: kLanes
// segments of equal length but the last (a short sample leaves the last ones empty).
inline std::pair<int64_t, int64_t> segment(int64_t L, int s) {
  const int64_t size = (L + kLanes - 1) / kLanes;
  return {std::min(s * size, L), std::min((s + 1) * size, L)};
}

// Sum of |x_j| over [begin, end) in double, eight partial sums (vectorizes).
template <typename scalar_t>
double abs_sum(const scalar_t* x, int64_t xs, int64_t begin, int64_t end) {
  double part[8] = {};
  int64_t j = begin;
  for (; j + 8 <= end; j += 8)
    for (int i = 0; i < 8; ++i) part[i] += std::abs(static_cast<double>(x[(j + i) * xs]));
  double rest = 0;
  for (; j < end; ++j) rest += std::abs(static_cast<double>(x[j * xs]));
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + rest;
}

// Per-thread buffers of the exact mode.
struct ExactScratch {
  std::vector<double> position;   // S_i of one chunk of draws, then +inf padding
  std::vector<double> chunk_end;  // S at the last draw of each chunk (r > draw_chunk())
  std::vector<uint8_t> drawn;     // one flag per element of the sample
};

// S_i = S + spacings d0 .. i of the sample's stream (base: its first value) into
// position[i - d0] for i in [d0, d1); returns S_{d1 - 1}. d0 is a multiple of kTile, so every
// call cuts the stream into the same tiles and regenerated sums are bit for bit the first ones.
inline double spacing_sums(Seed seed, uint64_t base, int64_t d0, int64_t d1, double S,
                           double* position) {
  alignas(64) uint32_t bits[kTile];
  alignas(64) float e[kTile];
  for (int64_t t = d0; t < d1; t += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, d1 - t));
    stream_bits(seed, base + t, count, bits);
    for (int k = 0; k < count; ++k) e[k] = -fast_log(1.0f - to_uniform(bits[k]));
    for (int k = 0; k < count; ++k) {
      S += e[k];
      position[t - d0 + k] = S;
    }
  }
  return S;
}

// How many of position[0..3] lie below lim: a prefix, since positions ascend.
inline int64_t below4(const double* position, double lim) {
#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
  const __m256d below = _mm256_cmp_pd(_mm256_loadu_pd(position), _mm256_set1_pd(lim), _CMP_LT_OQ);
  return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_pd(below)));
#else
  return int64_t(position[0] < lim) + int64_t(position[1] < lim) + int64_t(position[2] < lim) +
         int64_t(position[3] < lim);
#endif
}

// drawn[j] = 1 iff some draw lies in [C_{j-1}, C_j), in spacing units (C = prefix of |x| *
// S_r / sum|x| = factor * prefix of |x|; seg_start[s] = C at the start of segment s). position
// holds S_0 .. S_{r-1} and then four +inf. Segment s owns its elements and the draws below the
// start of the next segment with elements, or all the rest if it is the last: its elements' C
// are clamped to that limit and its last element takes every draw up to it, so rounding can
// neither lose a draw nor give it to two elements.
template <typename scalar_t>
void merge_draws(const scalar_t* x, int64_t xs, int64_t L, double pre, double factor,
                 const double* seg_start, const double* position, int64_t r, uint8_t* drawn) {
  int64_t d[kLanes], begin[kLanes], end[kLanes];
  double c[kLanes], limit[kLanes];
  for (int s = 0; s < kLanes; ++s) {
    std::tie(begin[s], end[s]) = segment(L, s);
    c[s] = seg_start[s];
    const bool last = s + 1 == kLanes || segment(L, s + 1).first == L;
    limit[s] = last ? std::numeric_limits<double>::infinity() : seg_start[s + 1];
    d[s] = std::lower_bound(position, position + r, seg_start[s]) - position;
  }
  // One element of segment s: advance its draw index past the draws below the element's end.
  auto step = [&](int s, int64_t j) {
    c[s] += std::abs(static_cast<double>(x[j * xs])) * pre * factor;
    const double lim = j == end[s] - 1 ? limit[s] : std::min(c[s], limit[s]);
    const int64_t d0 = d[s];
    int64_t dd = d0 + below4(position + d0, lim);
    if (dd - d0 == 4) {
      while (position[dd] < lim) ++dd;
    }
    drawn[j] = dd > d0;
    d[s] = dd;
  };
  // Every segment but the last is as long as the first; all of them run together up to the
  // last's length, the rest without it.
  const int64_t common = end[kLanes - 1] - begin[kLanes - 1];
  for (int64_t t = 0; t < common; ++t) {
#pragma GCC unroll 8
    for (int s = 0; s < kLanes; ++s) step(s, begin[s] + t);
  }
  for (int64_t t = common; t < end[0] - begin[0]; ++t) {
    for (int s = 0; s < kLanes; ++s)
      if (begin[s] + t < end[s]) step(s, begin[s] + t);
  }
}

// The draws of a sample for r > draw_chunk(), consumed in ascending order. chunk_end holds S at
// the last draw of each chunk (from the first pass); a chunk is generated into position only
// when an element ends inside it.
class DrawStream {
 public:
  DrawStream(Seed seed, uint64_t base, int64_t r, const double* chunk_end, double* position)
      : seed_(seed), base_(base), r_(r), chunk_(draw_chunk()), chunk_end_(chunk_end),
        position_(position) {}

  // Consumes the draws below lim; whether there were any.
  bool take(double lim) {
    const int64_t from = next_;
    while (next_ < r_) {
      const int64_t m = next_ / chunk_;
      if (chunk_end_[m] < lim) {
        next_ = std::min((m + 1) * chunk_, r_);
        continue;
      }
      if (loaded_ != m) {
        // Up to r + 1 values, as the first pass's tiles.
        spacing_sums(seed_, base_, m * chunk_, std::min((m + 1) * chunk_, r_ + 1),
                     m > 0 ? chunk_end_[m - 1] : 0.0, position_);
        loaded_ = m;
      }
      const double* position = position_ - m * chunk_;
      while (position[next_] < lim) ++next_;  // stops inside the chunk: its last S is >= lim
      break;
    }
    return next_ > from;
  }

 private:
  Seed seed_;
  uint64_t base_;
  int64_t r_, chunk_;
  const double* chunk_end_;
  double* position_;
  int64_t next_ = 0;     // draws below next_ are consumed
  int64_t loaded_ = -1;  // the chunk in position_
};

// merge_draws' result for r > draw_chunk(): the same segments, limits and clamps, walked in order
// against the stream of draws.
template <typename scalar_t>
void stream_draws(const scalar_t* x, int64_t xs, int64_t L, double pre, double factor,
                  const double* seg_start, DrawStream& draws, uint8_t* drawn) {
  for (int s = 0; s < kLanes; ++s) {
    const auto [begin, end] = segment(L, s);
    if (begin == end) break;
    const bool last = s + 1 == kLanes || segment(L, s + 1).first == L;
    const double limit = last ? std::numeric_limits<double>::infinity() : seg_start[s + 1];
    double c = seg_start[s];
    for (int64_t j = begin; j < end; ++j) {
      c += std::abs(static_cast<double>(x[j * xs])) * pre * factor;
      drawn[j] = draws.take(j == end - 1 ? limit : std::min(c, limit));
    }
  }
}

template <bool kUnit, typename scalar_t>
void sap_rows(const Rows<scalar_t>& t, int64_t n0, int64_t n1, int64_t L, Seed seed, int64_t r,
              bool exact) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t xs = kUnit ? 1 : t.xs1, ss = kUnit ? 1 : t.ss1, os = kUnit ? 1 : t.os1;
  const int64_t chunk = draw_chunk();
  ExactScratch scratch;
  if (exact) {
    scratch.position.resize(std::min(r, chunk) + 4);
    if (r > chunk) scratch.chunk_end.resize((r - 1) / chunk + 1);
    scratch.drawn.resize(L);
  }
  alignas(64) uint32_t bits[kTile];
  alignas(64) acc_t q[kTile];
  alignas(64) uint8_t kept[kTile];
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* x = t.x + n * t.xs0;
    const scalar_t* src = t.src + n * t.ss0;
    scalar_t* out = t.out + n * t.os0;
    // Exact mode sums |x| per segment of the merge; seg_start[s] becomes C at segment s.
    double seg_start[kLanes];
    double total = 0;
    if (exact) {
      for (int s = 0; s < kLanes; ++s) {
        seg_start[s] = total;
        const auto [begin, end] = segment(L, s);
        total += abs_sum(x, xs, begin, end);
      }
    } else {
      total = abs_sum(x, xs, 0, L);
    }
    // An all-zero sample has nothing to draw; a NaN or inf leaves p = |x| / sum|x| undefined,
    // and so does a total beyond acc_t, in which the reference sums (p = |x| / inf = 0): none of
    // them keeps anything (src * 0 is NaN at the non-finite elements, as in the reference).
    if (!(total > 0) || !(total <= static_cast<double>(std::numeric_limits<acc_t>::max()))) {
      for (int64_t j = 0; j < L; ++j) out[j * os] = src[j * ss] * scalar_t(0);
      continue;
    }
    const double pre = sap_tiny_total_scale<acc_t>(total);
    const acc_t pre_acc = static_cast<acc_t>(pre);
    const acc_t inv_total = static_cast<acc_t>(1.0 / (total * pre));
    const acc_t r_acc = static_cast<acc_t>(r);
    // q of elements j0 .. j0 + count - 1; then the outputs from kept[].
    auto tile_q = [&](int64_t j0, int count) {
      for (int k = 0; k < count; ++k)
        q[k] = std::abs(static_cast<acc_t>(x[(j0 + k) * xs])) * pre_acc * inv_total;
      keep_probabilities(q, count, r_acc);
    };
    auto tile_write = [&](int64_t j0, int count) {
      for (int k = 0; k < count; ++k) {
        const acc_t v = static_cast<acc_t>(src[(j0 + k) * ss]) / q[k];
        out[(j0 + k) * os] = static_cast<scalar_t>(kept[k] ? v : static_cast<acc_t>(src[(j0 + k) * ss]) * acc_t(0));
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
    // Exact: prefix sums S_d of the r + 1 spacings; S_r converts |x| into spacing units.
    const uint64_t base = static_cast<uint64_t>(n) * static_cast<uint64_t>(r + 1);
    double* position = scratch.position.data();
    double S = 0;
    if (r <= chunk) {
      S = spacing_sums(seed, base, 0, r + 1, 0.0, position);
    } else {
      for (int64_t d0 = 0; d0 <= r; d0 += chunk) {
        const int64_t d1 = std::min(d0 + chunk, r + 1);
        S = spacing_sums(seed, base, d0, d1, S, position);
        if (d0 < r) scratch.chunk_end[d0 / chunk] = position[std::min(d1, r) - 1 - d0];
      }
    }
    const double factor = S / (total * pre);
    for (int s = 0; s < kLanes; ++s) seg_start[s] = seg_start[s] * pre * factor;
    if (r <= chunk) {
      std::fill(position + r, position + r + 4, std::numeric_limits<double>::infinity());
      merge_draws(x, xs, L, pre, factor, seg_start, position, r, scratch.drawn.data());
    } else {
      DrawStream draws(seed, base, r, scratch.chunk_end.data(), position);
      stream_draws(x, xs, L, pre, factor, seg_start, draws, scratch.drawn.data());
    }
    for (int64_t j0 = 0; j0 < L; j0 += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, L - j0));
      tile_q(j0, count);
      // A zero |x| can only be reached through rounding at a segment end: never keep it.
      for (int k = 0; k < count; ++k) kept[k] = scratch.drawn[j0 + k] & (q[k] > acc_t(0));
      tile_write(j0, count);
    }
  }
}

template <typename scalar_t>
void sap_cpu_impl(const Rows<scalar_t>& t, int64_t N, int64_t L, Seed seed, int64_t r,
                  bool exact) {
  const bool unit = t.xs1 == 1 && t.ss1 == 1 && t.os1 == 1;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    if (unit) {
      sap_rows<true>(t, n0, n1, L, seed, r, exact);
    } else {
      sap_rows<false>(t, n0, n1, L, seed, r, exact);
    }
  });
}

}  // namespace

void sap_kernel(const at::Tensor& src, const at::Tensor& x, Seed seed, int64_t r, bool exact,
                at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sap_cpu", [&] {
    const Rows<scalar_t> t{x.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                           src.stride(0), src.stride(1), out.stride(0), out.stride(1)};
    sap_cpu_impl<scalar_t>(t, x.size(0), x.size(1), seed, r, exact);
  });
}
PYPRUNE_ISA_END

#ifndef PYPRUNE_CPU_AVX2
PYPRUNE_CPU_DECLARE(void, sap_kernel, const at::Tensor&, const at::Tensor&, Seed, int64_t, bool,
                    at::Tensor&)

namespace pyprune {
namespace {

at::Tensor sap_cpu_common(const at::Tensor& src, const at::Tensor& x, const at::Tensor& seed,
                          int64_t r, bool exact) {
  TORCH_CHECK(x.device().is_cpu(), "sap (cpu): x must be a CPU tensor, got ", x.device());
  at::Tensor out = at::empty_like(src);
  if (x.numel() == 0) return out;
  const int64_t* sp = seed.const_data_ptr<int64_t>();
  const Seed s{static_cast<uint64_t>(sp[0]), static_cast<uint64_t>(sp[seed.stride(0)])};
  PYPRUNE_CPU_KERNEL(sap_kernel, src, x, s, r, exact, out);
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
#endif  // PYPRUNE_CPU_AVX2
