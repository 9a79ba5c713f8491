// k-WTA on the CPU. Per group, the k-th largest key is found in the same pass that writes the
// output: a strided sample brackets the threshold, the pass keeps everything above the bracket,
// drops everything below it and collects the few keys inside it, and a selection among those
// settles the threshold (Floyd-Rivest style). Radix select over the whole group is the fallback
// when the bracket misses; small groups select on a copy of their keys. Parallel over groups, or
// within a group when groups are few and large.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kwta.h"
#include "isa.h"

#if PYPRUNE_HAVE_AVX2
#include <immintrin.h>
#endif

PYPRUNE_ISA_BEGIN
namespace {

constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;
// Up to this group size, selecting on a copy of the keys beats sampling a bracket.
constexpr int64_t kSmallGroup = 1024;
// A group is split across threads only when it is this large.
constexpr int64_t kSplitGroup = 1 << 15;
// The bracket pass works in blocks of this many keys, and stores candidate positions relative
// to its start in 32 bits, so one pass covers at most kMaxPass elements.
constexpr int64_t kBlock = 64;
constexpr int64_t kMaxPass = int64_t(1) << 31;

// v if cond else 0, by masking the bits: the masks are data-dependent coin flips that a
// branch would mispredict.
template <typename scalar_t>
inline scalar_t keep_or_zero(scalar_t v, bool cond) {
  using Bits = std::conditional_t<sizeof(scalar_t) == 8, uint64_t,
                                  std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>>;
  return c10::bit_cast<scalar_t>(Bits(c10::bit_cast<Bits>(v) & (Bits(0) - Bits(cond))));
}

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

// The rank-th largest (1-based) of keys[0, count), all in [lo, hi]: they share the bits above
// the highest bit where lo and hi differ, so 8-bit digits below it narrow them (histogram, pick
// the digit, keep its keys in place) until a few remain for nth_element. Reorders keys.
template <typename U>
U kth_largest(U* keys, int64_t count, int64_t rank, U lo, U hi) {
  constexpr int kBits = sizeof(U) * 8;
  int shift = lo == hi ? 0 : kBits - (sizeof(U) == 8 ? __builtin_clzll(uint64_t(lo ^ hi))
                                                      : __builtin_clz(uint32_t(lo ^ hi)));
  while (count > 64 && shift > 0) {
    const int low = std::max(shift - 8, 0);
    const int bins = 1 << (shift - low);
    int64_t hist[256] = {};
    for (int64_t j = 0; j < count; ++j) ++hist[(keys[j] >> low) & U(bins - 1)];
    const U digit = U(pick_digit(hist, bins, rank));
    int64_t m = 0;
    for (int64_t j = 0; j < count; ++j) {
      const U key = keys[j];
      keys[m] = key;
      m += ((key >> low) & U(bins - 1)) == digit;
    }
    count = m;
    shift = low;
  }
  std::nth_element(keys, keys + (rank - 1), keys + count, std::greater<U>());
  return keys[rank - 1];
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
  // Pass 1: histogram of the top digit over the whole group.
  const int shift = total_bits - kRadixBits;
  std::fill(hist, hist + chunks * kBins, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist + c * kBins;
      const int64_t end = std::min(g.size, (c + 1) * per_chunk);
      for (int64_t i = c * per_chunk; i < end; ++i) ++h[key_at(i) >> shift];
    }
  });
  for (int64_t c = 1; c < chunks; ++c)
    for (int b = 0; b < kBins; ++b) hist[b] += hist[c * kBins + b];
  const U prefix = U(pick_digit(hist, kBins, k)) << shift;
  const U prefix_mask = U(kBins - 1) << shift;

  // Pass 2: gather the keys of that bucket (each chunk into its own range of buf); they share
  // the top digit, and kth_largest narrows them on the digits below it.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * per_chunk, end = std::min(g.size, begin + per_chunk);
      int64_t m = begin;
      for (int64_t i = begin; i < end; ++i) {
        const U key = key_at(i);
        if ((key & prefix_mask) == prefix) buf[m++] = key;
      }
      fill[c] = m - begin;
    }
  });
  int64_t count = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    std::memmove(buf + count, buf + c * per_chunk, fill[c] * sizeof(U));
    count += fill[c];
  }
  return kth_largest(buf, count, k, prefix, U(prefix | ~prefix_mask));
}

// kth_largest over any keys: their range first (one vectorized pass).
template <typename U>
U kth_largest_of(U* keys, int64_t count, int64_t rank) {
  U lo = keys[0], hi = keys[0];
  for (int64_t j = 1; j < count; ++j) {
    lo = std::min(lo, keys[j]);
    hi = std::max(hi, keys[j]);
  }
  return kth_largest(keys, count, rank, lo, hi);
}

// Per-thread scratch, sized once per group size.
template <typename U>
struct Scratch {
  explicit Scratch(int64_t L, int64_t chunks)
      : cap(std::max<int64_t>(4096, L / 4)),
        keys(cap + chunks * kBlock),
        index(cap + chunks * kBlock),
        select(cap),
        fill(chunks) {}
  int64_t cap;  // candidates per group; each chunk's region has kBlock slots of slack beyond it
  std::vector<U> keys;
  std::vector<uint32_t> index;
  std::vector<U> select;
  std::vector<int64_t> fill;
  std::vector<U> radix;       // fallback only
  std::vector<int64_t> hist;  // fallback only
};

// Bracket [lo, hi] around the k-th largest key from a strided sample of the group, wide enough
// (a few standard deviations of the sample rank) that it holds the k-th key in nearly every
// group; lo = 0 / hi = max key when the bracket reaches an end of the group.
template <typename scalar_t, typename U>
std::pair<U, U> sample_bracket(const Group<scalar_t>& g, int64_t k, bool absolute, U* sample,
                               U* copy) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  const int64_t kSample = std::min<int64_t>(1024, std::max<int64_t>(256, g.size / 16));
  const int64_t step = g.size / kSample;
  for (int64_t j = 0; j < kSample; ++j)
    sample[j] = to_key<acc_t, U>(static_cast<acc_t>(g[j * step]), absolute);
  const double rank = double(k) * kSample / double(g.size);
  const double margin = 3.0 * std::sqrt(rank * (1.0 - rank / kSample)) + 1.0;
  const int64_t hi_rank = int64_t(std::floor(rank - margin));  // 1-based from the top
  const int64_t lo_rank = int64_t(std::ceil(rank + margin));
  U lo = 0, hi = ~U(0);
  if (lo_rank <= kSample) {
    std::copy_n(sample, kSample, copy);
    lo = kth_largest_of(copy, kSample, lo_rank);
  }
  if (hi_rank >= 1) hi = kth_largest_of(sample, kSample, hi_rank);
  return {lo, hi};
}

// Appends the flagged ones of n keys (flags: one byte each, 0 or 1) and their positions
// base + j to keys/index at m, returning the new m. Stores may run kBlock slots past the new m
// (the buffers have that slack); no branch depends on a flag.
template <typename U>
inline int64_t append_flagged(const U* block, const uint8_t* flags, int64_t n, uint32_t base,
                              U* keys, uint32_t* index, int64_t m) {
#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
  if constexpr (sizeof(U) == 4) {
    if (n == kBlock) {
      // Eight keys at a time: the flags' bits pick a lane permutation that packs the kept lanes
      // to the front, one unaligned store, advance by their count.
      static constexpr auto kPack = [] {
        std::array<uint64_t, 256> table{};
        for (int mask = 0; mask < 256; ++mask) {
          int out = 0;
          for (int lane = 0; lane < 8; ++lane)
            if (mask >> lane & 1) table[mask] |= uint64_t(lane) << (8 * out++);
        }
        return table;
      }();
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t w0 = 0; w0 < kBlock; w0 += 8) {
        uint64_t word;
        std::memcpy(&word, flags + w0, 8);
        const unsigned mask = unsigned(_pext_u64(word, 0x0101010101010101ull));
        const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(kPack[mask])));
        const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + w0));
        const __m256i pos = _mm256_add_epi32(_mm256_set1_epi32(int(base + uint32_t(w0))), lanes);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + m), _mm256_permutevar8x32_epi32(k, perm));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + m), _mm256_permutevar8x32_epi32(pos, perm));
        m += __builtin_popcount(mask);
      }
      return m;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    keys[m] = block[j];
    index[m] = base + uint32_t(j);
    m += flags[j];
  }
  return m;
}

// One pass over elements [begin, end) of a group (end - begin <= kMaxPass): out = where(key >=
// lo, x, 0), the number of keys above hi, and the keys in [lo, hi] with their positions
// relative to begin (at most `cap`; the count returned may exceed it, which means overflow).
// Blocks of 64 keep the write, the counts and the collection free of data-dependent branches;
// only the few in-bracket positions are visited again.
template <bool kUnit, typename scalar_t, typename U>
std::pair<int64_t, int64_t> bracket_pass(const Group<scalar_t>& g, scalar_t* o, int64_t ol,
                                         int64_t begin, int64_t end, U lo, U hi, bool absolute,
                                         U* keys, uint32_t* index, int64_t cap) {
  using acc_t = typename KeyTraits<scalar_t>::acc_t;
  const scalar_t* x = g.base;
  const int64_t sx = kUnit ? 1 : g.stride, so = kUnit ? 1 : ol;
  int64_t above = 0, m = 0;
  U block[kBlock];
  uint8_t flags[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    uint32_t block_above = 0;  // 32-bit lanes: the count stays in the key vectors' width
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t v = x[(b + j) * sx];
      const U key = to_key<acc_t, U>(static_cast<acc_t>(v), absolute);
      block[j] = key;
      o[(b + j) * so] = keep_or_zero(v, key >= lo);
      block_above += key > hi;
      flags[j] = U(key - lo) <= U(hi - lo);
    }
    above += block_above;
    if (m <= cap) {
      m = append_flagged(block, flags, n, uint32_t(b - begin), keys, index, m);
    } else {  // overflowed: only the count matters now
      for (int64_t j = 0; j < n; ++j) m += flags[j];
    }
  }
  return {above, m};
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
  const int64_t per_chunk = (L + chunks - 1) / chunks;

  // out = where(key >= thr, x, 0) over the whole group.
  auto write_all = [&](const Group<scalar_t>& g, scalar_t* o, U thr) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const int64_t begin = c0 * per_chunk, end = std::min(L, c1 * per_chunk);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t v = g[i];
        o[i * ol] = keep_or_zero(v, to_key<acc_t, U>(static_cast<acc_t>(v), absolute) >= thr);
      }
    });
  };

  // Small groups: select on a copy of the keys, then write.
  auto small_group = [&](const Group<scalar_t>& g, scalar_t* o, Scratch<U>& s) {
    for (int64_t i = 0; i < L; ++i) s.keys[i] = to_key<acc_t, U>(static_cast<acc_t>(g[i]), absolute);
    const U thr = kth_largest_of(s.keys.data(), L, k);
    for (int64_t i = 0; i < L; ++i) {
      const scalar_t v = g[i];
      o[i * ol] = keep_or_zero(v, to_key<acc_t, U>(static_cast<acc_t>(v), absolute) >= thr);
    }
    return thr;
  };

  // Radix select over the whole group, then the write.
  auto radix_group = [&](const Group<scalar_t>& g, scalar_t* o, Scratch<U>& s) {
    s.radix.resize(L);
    s.hist.resize(chunks * kBins);
    const U thr = radix_select<scalar_t, U>(g, k, absolute, chunks, s.radix.data(), s.hist.data(),
                                            s.fill.data());
    write_all(g, o, thr);
    return thr;
  };
  // Large groups: one pass writes out = where(key >= lo, x, 0), counts keys above hi and
  // collects the keys in [lo, hi] with their positions; the k-th largest key is then selected
  // among those few candidates and the candidates below it are zeroed. When the sampled bracket
  // misses (or overflows the candidate buffer) the group falls back to a full radix select,
  // as do groups with more than kMaxPass elements per thread.
  auto large_group = [&](const Group<scalar_t>& g, scalar_t* o, Scratch<U>& s) {
    if (per_chunk > kMaxPass) return radix_group(g, o, s);
    const auto [lo, hi] = sample_bracket<scalar_t, U>(g, k, absolute, s.select.data(), s.keys.data());
    const int64_t cap = s.cap / chunks, region = cap + kBlock;
    std::vector<int64_t> above(chunks, 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * per_chunk, end = std::min(L, begin + per_chunk);
        const auto counts = sl == 1 && ol == 1
            ? bracket_pass<true, scalar_t, U>(g, o, ol, begin, end, lo, hi, absolute,
                                              s.keys.data() + c * region,
                                              s.index.data() + c * region, cap)
            : bracket_pass<false, scalar_t, U>(g, o, ol, begin, end, lo, hi, absolute,
                                               s.keys.data() + c * region,
                                               s.index.data() + c * region, cap);
        above[c] = counts.first;
        s.fill[c] = counts.second;
      }
    });
    int64_t total_above = 0, count = 0;
    bool overflow = false;
    for (int64_t c = 0; c < chunks; ++c) {
      total_above += above[c];
      overflow |= s.fill[c] > cap;
    }
    if (!overflow) {
      for (int64_t c = 0; c < chunks; ++c) {
        std::copy_n(s.keys.data() + c * region, s.fill[c], s.select.data() + count);
        count += s.fill[c];
      }
    }
    if (overflow || !(total_above < k && k <= total_above + count)) return radix_group(g, o, s);
    const U thr = kth_largest(s.select.data(), count, k - total_above, lo, hi);
    for (int64_t c = 0; c < chunks; ++c) {
      const U* keys = s.keys.data() + c * region;
      const uint32_t* index = s.index.data() + c * region;
      scalar_t* const oc = o + c * per_chunk * ol;
      const int64_t stride = ol, fill = s.fill[c];
      for (int64_t j = 0; j < fill; ++j) {  // a branch here would mispredict about half the time
        scalar_t& v = oc[index[j] * stride];
        v = keep_or_zero(v, keys[j] >= thr);
      }
    }
    return thr;
  };

  auto run_groups = [&](int64_t g0, int64_t g1) {
    Scratch<U> scratch(L, chunks);
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t n = gi / C, c = gi % C;
      const Group<scalar_t> g{xp + n * sn + c * sc, sl, L};
      scalar_t* o = op + n * on + c * oc;
      const U thr = L > kSmallGroup ? large_group(g, o, scratch) : small_group(g, o, scratch);
      tp[gi] = static_cast<scalar_t>(from_key<acc_t, U>(thr));
    }
  };
  if (chunks > 1) {
    run_groups(0, G);
  } else {
    at::parallel_for(0, G, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), run_groups);
  }
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
        for (int64_t i = i0; i < i1; ++i) og[i] = keep_or_zero(gg[i], keep<acc_t>(xg[i], t, absolute));
      } else {
        for (int64_t i = i0; i < i1; ++i)
          og[i * so] = keep_or_zero(gg[i * sg], keep<acc_t>(xg[i * sx], t, absolute));
      }
    }
  });
}

}  // namespace

void kwta_kernel(const at::Tensor& x, int64_t k, bool absolute, at::Tensor& out,
                 at::Tensor& threshold) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kwta_cpu", [&] {
    kwta_cpu_impl<scalar_t>(x, k, absolute, out, threshold);
  });
}

void kwta_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& threshold,
                          bool absolute, at::Tensor& gx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kwta_backward_cpu", [&] {
    kwta_backward_cpu_impl<scalar_t>(grad, x, threshold, absolute, gx);
  });
}
PYPRUNE_ISA_END

#ifndef PYPRUNE_CPU_AVX2
PYPRUNE_CPU_DECLARE(void, kwta_kernel, const at::Tensor&, int64_t, bool, at::Tensor&, at::Tensor&)
PYPRUNE_CPU_DECLARE(void, kwta_backward_kernel, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, bool, at::Tensor&)

namespace pyprune {
namespace {

std::tuple<at::Tensor, at::Tensor> kwta_cpu(const at::Tensor& x, int64_t k, bool absolute) {
  check_kwta_args(x, k);
  TORCH_CHECK(x.device().is_cpu(), "kwta (cpu): x must be a CPU tensor, got ", x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor threshold = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.numel() == 0) return {out, threshold};
  PYPRUNE_CPU_KERNEL(kwta_kernel, x, k, absolute, out, threshold);
  return {out, threshold};
}

at::Tensor kwta_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                             const at::Tensor& threshold, bool absolute) {
  check_kwta_backward_args(grad, x, threshold);
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  PYPRUNE_CPU_KERNEL(kwta_backward_kernel, grad, x, threshold, absolute, gx);
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("kwta", &kwta_cpu);
  m.impl("_kwta_backward", &kwta_backward_cpu);
}

}  // namespace pyprune
#endif  // PYPRUNE_CPU_AVX2
