// Convolution with an unstructured boolean weight mask on the CPU: conv2d(x, weight * mask,
// bias), groups 1. Below a density threshold (sparse_pays) a direct sparse convolution does only
// the kept weights' work; above it oneDNN runs on the masked weight.
//
// Direct sparse convolution: each sample's input is copied once, zero-padded, into phase planes
// (for stride s, plane (a, b) holds padded rows a, a + s, ... and columns b, b + s, ...), each
// of pitch P. In that layout the output, taken as a flat run of h_out * P positions (the columns
// from w_out to P are computed and dropped), is for every kept weight (o, i, kh, kw) the same
// run of the input shifted by one offset. So output channel o is a sum of shifted contiguous
// runs, one per kept weight of row o: a tile of the run is held in vector registers while the
// kept weights of o stream past (one broadcast, eight loads and eight multiply-adds each), then
// stored once. The kept weights are listed per output channel (CSR) with their offsets, built
// per call (weight-sized work).
//
// For small outputs (interleaved_layout) the same layout holds a vector of samples at every
// position instead of one value, so each kept weight's loads are aligned vectors of samples and
// a tile is any eight output positions: no dropped columns, no partial vectors.
//
// Backward: the weight gradient only at the kept weights, each a dot product of an output
// channel's gradient (laid out as the same run, zeros in the dropped columns, or interleaved
// like the input) with the weight's shifted input run; the input gradient, for stride 1, is this
// forward kernel on the gradient with the transposed, flipped weight and mask. Both follow the
// same density rule.
//
// The AVX2 build uses fused multiply-adds here, so its results differ from the baseline build's
// in rounding (as oneDNN's do between machines); every other kernel is bit-identical across the
// two (csrc/cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../masked_conv.h"
#include "isa.h"

#if PYPRUNE_HAVE_AVX2
#include <immintrin.h>
#endif

namespace pyprune {
namespace {

// Whether the direct sparse convolution runs on the batch-interleaved layout (below) rather than
// on per-sample runs: for small outputs (at most 12x12, or 16x16 when strided, whose per-sample
// phase planes waste the most) and at least a full vector of samples. Measured against the run
// layout on a 2-core AMD EPYC (float32, 10% kept): 1.2x at 8x8 and 1.15-1.6x at 4x4 (stride 1),
// 1.3-1.5x at 8x8 and 1.6-1.8x at 4x4 (stride 2), 1.24x at 16x16 from stride 2, 0.9-1.1x at
// 12x12-16x16 (stride 1), 0.84x with 4 samples, 0.46x at 32x32.
// PYPRUNE_SPARSE_LAYOUT=run or =interleaved forces a layout (tests run both).
inline bool interleaved_layout(const masked_conv::Geometry& g, int64_t element_size) {
  if (const char* force = std::getenv("PYPRUNE_SPARSE_LAYOUT")) {
    if (std::strcmp(force, "run") == 0) return false;
    if (std::strcmp(force, "interleaved") == 0) return true;
  }
  const int64_t lanes = 32 / element_size, hw = g.h_out * g.w_out;
  return g.n >= lanes && hw <= (g.stride[0] * g.stride[1] > 1 ? 256 : 144);
}

}  // namespace
}  // namespace pyprune

PYPRUNE_ISA_BEGIN
namespace {

using masked_conv::Geometry;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};

// acc + w * v: fused in the AVX2 build.
template <typename T, typename V>
inline V multiply_add(V acc, V w, V v) {
#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
  if constexpr (sizeof(T) == 4) {
    return (V)_mm256_fmadd_ps((__m256)w, (__m256)v, (__m256)acc);
  } else {
    return (V)_mm256_fmadd_pd((__m256d)w, (__m256d)v, (__m256d)acc);
  }
#else
  return acc + w * v;
#endif
}

// The padded, phase-split layout of one sample's input.
struct Layout {
  int64_t s0, s1;          // stride
  int64_t rows, pitch;     // of one phase plane: ceil(padded H / s0) x ceil(padded W / s1)
  int64_t plane, channel;  // elements per phase plane, per input channel (s0 * s1 planes)
  int64_t run;             // output positions computed: h_out * pitch
};

Layout layout_of(const Geometry& g) {
  Layout l;
  l.s0 = g.stride[0];
  l.s1 = g.stride[1];
  l.rows = (g.h + 2 * g.padding[0] + l.s0 - 1) / l.s0;
  l.pitch = (g.w + 2 * g.padding[1] + l.s1 - 1) / l.s1;
  l.plane = l.rows * l.pitch;
  l.channel = l.s0 * l.s1 * l.plane;
  l.run = g.h_out * l.pitch;
  return l;
}

// Kept weights per output channel: values and their input offsets in the layout.
template <typename T>
struct Csr {
  std::vector<int64_t> row;
  std::vector<int64_t> offset;
  std::vector<T> value;
  std::vector<int64_t> flat;  // index into the weight
};

template <typename T>
Csr<T> csr_of(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g, const Layout& l,
              int64_t kept) {
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  const T* wp = w.const_data_ptr<T>();
  const bool* mp = m.const_data_ptr<bool>();
  // The offset of each (i, kh, kw) of a row, the same for every row.
  const int64_t per_row = g.c_in * g.kh * g.kw;
  std::vector<int64_t> offset_of(per_row);
  for (int64_t i = 0; i < g.c_in; ++i) {
    for (int64_t kh = 0; kh < g.kh; ++kh) {
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        const int64_t dh = kh * g.dilation[0], dw = kw * g.dilation[1];
        const int64_t phase = (dh % l.s0) * l.s1 + dw % l.s1;
        offset_of[(i * g.kh + kh) * g.kw + kw] =
            i * l.channel + phase * l.plane + (dh / l.s0) * l.pitch + dw / l.s1;
      }
    }
  }
  Csr<T> csr;
  csr.row.resize(g.c_out + 1);
  csr.offset.resize(kept);
  csr.value.resize(kept);
  csr.flat.resize(kept);
  int64_t e = 0;
  auto push = [&](int64_t flat) {  // the kept weight at weight index `flat`
    TORCH_CHECK(e < kept, "_sparse_conv2d: weight_mask changed while in use");
    csr.offset[e] = offset_of[flat % per_row];
    csr.flat[e] = flat;
    csr.value[e++] = wp[flat];
  };
  for (int64_t o = 0; o < g.c_out; ++o) {
    csr.row[o] = e;
    const int64_t first = o * per_row, last = first + per_row;
    int64_t j = first;
    for (; j + 8 <= last; j += 8) {  // eight mask bytes at a time: most words are 0 when sparse
      uint64_t word;
      std::memcpy(&word, mp + j, 8);
      for (; word != 0; word &= word - 1) push(j + (__builtin_ctzll(word) >> 3));
    }
    for (; j < last; ++j)
      if (mp[j]) push(j);
  }
  csr.row[g.c_out] = e;
  return csr;
}

// The columns [q0, q1) of a row of phase-column b's planes that hold input: w = q * s1 + b - p1
// in [0, W).
inline std::pair<int64_t, int64_t> input_columns(const Geometry& g, const Layout& l, int64_t b) {
  const int64_t p1 = g.padding[1];
  const int64_t q0 = std::min(l.pitch, std::max<int64_t>(0, (p1 - b + l.s1 - 1) / l.s1));
  const int64_t last = g.w - 1 + p1 - b;
  return {q0, last < 0 ? q0 : std::max(q0, std::min(l.pitch, last / l.s1 + 1))};
}

// Copies channels [c0, c1) of sample n of x into the layout at `dst`, zeros around.
template <typename T>
void fill_layout(const at::Tensor& x, int64_t n, int64_t c0, int64_t c1, const Geometry& g,
                 const Layout& l, T* dst) {
  const T* xp = x.const_data_ptr<T>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t p0 = g.padding[0], p1 = g.padding[1];
  for (int64_t c = c0; c < c1; ++c) {
    const T* src = xp + n * sn + c * sc;
    for (int64_t a = 0; a < l.s0; ++a) {
      for (int64_t b = 0; b < l.s1; ++b) {
        T* plane = dst + c * l.channel + (a * l.s1 + b) * l.plane;
        for (int64_t r = 0; r < l.rows; ++r) {
          T* row = plane + r * l.pitch;
          const int64_t h = r * l.s0 + a - p0;
          if (h < 0 || h >= g.h) {
            std::fill(row, row + l.pitch, T(0));
            continue;
          }
          const auto [q0, q1] = input_columns(g, l, b);
          std::fill(row, row + q0, T(0));
          const T* srow = src + h * sh + (q0 * l.s1 + b - p1) * sw;
          const int64_t step = l.s1 * sw;
          if (step == 1) {
            std::memcpy(row + q0, srow, (q1 - q0) * sizeof(T));
          } else {
            for (int64_t q = q0; q < q1; ++q) row[q] = srow[(q - q0) * step];
          }
          std::fill(row + q1, row + l.pitch, T(0));
        }
      }
    }
  }
}

// Output channels [o0, o1) of positions [f0, f0 + kVecs * lanes) of the run (clipped to it),
// for one sample: src is its layout at f0.
template <typename T, int kVecs>
void sparse_tile(const Csr<T>& csr, const T* bias, const T* src, const Geometry& g,
                 const Layout& l, int64_t f0, int64_t o0, int64_t o1, T* out, int64_t oc,
                 int64_t oh, int64_t ow) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes, tile = kVecs * lanes;
  alignas(32) T buf[tile];
  const int64_t* off = csr.offset.data();
  const T* val = csr.value.data();
  for (int64_t o = o0; o < o1; ++o) {
    const T b = bias != nullptr ? bias[o] : T(0);
    V acc[kVecs];
    for (int v = 0; v < kVecs; ++v) acc[v] = V{} + b;
    for (int64_t e = csr.row[o]; e < csr.row[o + 1]; ++e) {
      const V w = V{} + val[e];
      const T* p = src + off[e];
      for (int v = 0; v < kVecs; ++v) {
        V x;
        std::memcpy(&x, p + v * lanes, sizeof(V));
        acc[v] = multiply_add<T>(acc[v], w, x);
      }
    }
    std::memcpy(buf, acc, sizeof(buf));
    // Position f of the run is row f / pitch, column f % pitch; columns from w_out are dropped.
    const int64_t f1 = std::min(f0 + tile, l.run);
    for (int64_t h = f0 / l.pitch; h * l.pitch < f1; ++h) {
      const int64_t w0 = std::max(f0 - h * l.pitch, int64_t(0));
      const int64_t w1 = std::min(f1 - h * l.pitch, g.w_out);
      T* dst = out + o * oc + h * oh;
      const T* from = buf + (h * l.pitch - f0);
      for (int64_t w = w0; w < w1; ++w) dst[w * ow] = from[w];
    }
  }
}

// f(std::integral_constant<int, k>{}) for k = vecs, 1 to 8 (more: 8): the register tiles'
// vector counts as compile-time constants.
template <typename F>
inline void with_vecs(int64_t vecs, F&& f) {
  switch (vecs) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Output channels [o0, o1) of one sample from its layout `src`: the run in tiles of eight
// vectors (held in registers while a row's kept weights stream past), the last tile only as
// many vectors as the run has left (small planes compute little they then drop).
template <typename T>
void sparse_rows(const Csr<T>& csr, const T* bias, const T* src, const Geometry& g,
                 const Layout& l, int64_t o0, int64_t o1, T* out, int64_t oc, int64_t oh,
                 int64_t ow) {
  constexpr int64_t lanes = Vec<T>::lanes;
  for (int64_t f0 = 0; f0 < l.run;) {
    const int64_t vecs = std::min<int64_t>(8, (l.run - f0 + lanes - 1) / lanes);
    with_vecs(vecs, [&](auto kVecs) {
      sparse_tile<T, decltype(kVecs)::value>(csr, bias, src + f0, g, l, f0, o0, o1, out, oc, oh, ow);
    });
    f0 += vecs * lanes;
  }
}

// Whether the layout's first `count` values are all finite (x - x is NaN exactly for inf and
// NaN; the sum vectorizes).
template <typename T>
bool all_finite(const T* p, int64_t count) {
  T acc = 0;
  for (int64_t i = 0; i < count; ++i) acc += p[i] - p[i];
  return acc == T(0);
}

// Elements of a layout buffer for `l`: every input channel, plus what the runs read past the
// last one (an in-channel offset, at most one channel, and `reach` positions beyond the run).
int64_t layout_size(const Geometry& g, const Layout& l, int64_t reach) {
  return g.c_in * l.channel + l.channel + reach;
}

template <typename T>
void interleaved_conv_impl(const Csr<T>& csr, const at::Tensor& x, const T* bp, const Geometry& g,
                           const Layout& l, at::Tensor& out, std::vector<char>& finite);

// Fills `finite[n]` for the samples it computes; a sample holding inf or NaN is left to the
// dense engine (its result must carry the NaN that 0 * inf gives at masked weights).
template <typename T>
void sparse_conv_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                      const std::optional<at::Tensor>& bias, const Geometry& g, int64_t kept,
                      at::Tensor& out, std::vector<char>& finite) {
  const Layout l = layout_of(g);
  const Csr<T> csr = csr_of<T>(weight, mask, g, l, kept);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
  if (interleaved_layout(g, sizeof(T))) {
    interleaved_conv_impl<T>(csr, x, bp, g, l, out, finite);
    return;
  }
  T* op = out.mutable_data_ptr<T>();
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  const int64_t scratch = layout_size(g, l, 8 * Vec<T>::lanes);  // a tile of eight vectors
  const int64_t threads = at::get_num_threads();
  if (g.n >= threads) {
    // Samples split over threads, each with a layout of its own.
    at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> layout(scratch, T(0));
      for (int64_t n = n0; n < n1; ++n) {
        fill_layout<T>(x, n, 0, g.c_in, g, l, layout.data());
        finite[n] = all_finite(layout.data(), g.c_in * l.channel);
        if (finite[n]) sparse_rows<T>(csr, bp, layout.data(), g, l, 0, g.c_out, op + n * on, oc, oh, ow);
      }
    });
    return;
  }
  // Few samples: each sample's channels split over threads.
  std::vector<T> layout(scratch, T(0));
  for (int64_t n = 0; n < g.n; ++n) {
    at::parallel_for(0, g.c_in, 1, [&](int64_t c0, int64_t c1) {
      fill_layout<T>(x, n, c0, c1, g, l, layout.data());
    });
    finite[n] = all_finite(layout.data(), g.c_in * l.channel);
    if (!finite[n]) continue;
    at::parallel_for(0, g.c_out, 1, [&](int64_t o0, int64_t o1) {
      sparse_rows<T>(csr, bp, layout.data(), g, l, o0, o1, op + n * on, oc, oh, ow);
    });
  }
}

// Batch-interleaved variant, for small outputs: one vector holds one position of `lanes`
// samples. The layout is the one above with every value widened to a vector of the samples
// [n0, n0 + lanes) (lanes past the batch hold stale finite-or-not values whose results are
// dropped), so every load is aligned and only the output positions themselves are computed: a
// tile is any kVecs output positions, each addressed on its own, with no dropped columns and no
// partial vectors.

// Copies samples [n0, n0 + count) of x into the interleaved layout at `dst` (channels [c0, c1)),
// whose zero padding was written once when it was allocated; zero_rest: the lanes past `count`
// are zeroed too (else they keep what an earlier group left).
template <typename T>
void fill_interleaved(const at::Tensor& x, int64_t n0, int64_t count, int64_t c0, int64_t c1,
                      const Geometry& g, const Layout& l, T* dst, bool zero_rest = false) {
  constexpr int64_t lanes = Vec<T>::lanes;
  const T* xp = x.const_data_ptr<T>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t p0 = g.padding[0], p1 = g.padding[1];
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t a = 0; a < l.s0; ++a) {
      for (int64_t b = 0; b < l.s1; ++b) {
        T* plane = dst + (c * l.channel + (a * l.s1 + b) * l.plane) * lanes;
        for (int64_t r = 0; r < l.rows; ++r) {
          const int64_t h = r * l.s0 + a - p0;
          if (h < 0 || h >= g.h) continue;
          const auto [q0, q1] = input_columns(g, l, b);
          T* row = plane + r * l.pitch * lanes;
          for (int64_t s = 0; s < count; ++s) {
            const T* srow = xp + (n0 + s) * sn + c * sc + h * sh + (q0 * l.s1 + b - p1) * sw;
            const int64_t step = l.s1 * sw;
            for (int64_t q = q0; q < q1; ++q) row[q * lanes + s] = srow[(q - q0) * step];
          }
          if (zero_rest) {
            for (int64_t s = count; s < lanes; ++s)
              for (int64_t q = q0; q < q1; ++q) row[q * lanes + s] = T(0);
          }
        }
      }
    }
  }
}

// Output channels [o0, o1) at the kVecs output positions whose layout offsets (in vectors) are
// base[0..kVecs) of the samples in the interleaved layout `src`; results to acc[(o - o0) *
// kVecs + v].
template <typename T, int kVecs>
void interleaved_tile(const Csr<T>& csr, const T* bias, const T* src, const int64_t* base,
                      int64_t o0, int64_t o1, typename Vec<T>::type* result) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  const int64_t* off = csr.offset.data();
  const T* val = csr.value.data();
  const T* at[kVecs];
  for (int v = 0; v < kVecs; ++v) at[v] = src + base[v] * lanes;
  for (int64_t o = o0; o < o1; ++o) {
    const T b = bias != nullptr ? bias[o] : T(0);
    V acc[kVecs];
    for (int v = 0; v < kVecs; ++v) acc[v] = V{} + b;
    for (int64_t e = csr.row[o]; e < csr.row[o + 1]; ++e) {
      const V w = V{} + val[e];
      const int64_t shift = off[e] * lanes;
      for (int v = 0; v < kVecs; ++v) {
        V x;
        std::memcpy(&x, at[v] + shift, sizeof(V));
        acc[v] = multiply_add<T>(acc[v], w, x);
      }
    }
    std::memcpy(result + (o - o0) * kVecs, acc, sizeof(acc));
  }
}

// Output channels [o0, o1) of samples [n0, n0 + count) from their interleaved layout: the
// output positions in tiles of eight, each tile's results scattered to the samples.
template <typename T>
void interleaved_rows(const Csr<T>& csr, const T* bias, const T* src, const Geometry& g,
                      const Layout& l, int64_t n0, int64_t count, int64_t o0, int64_t o1, T* out,
                      int64_t on, int64_t oc, int64_t oh, int64_t ow) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  constexpr int64_t kBlock = 16;  // output channels per pass over a tile's results
  alignas(32) V result[kBlock * 8];
  const int64_t positions = g.h_out * g.w_out;
  for (int64_t p0 = 0; p0 < positions; p0 += 8) {
    const int vecs = int(std::min<int64_t>(8, positions - p0));
    int64_t base[8];
    for (int v = 0; v < vecs; ++v) {
      const int64_t p = p0 + v;
      base[v] = (p / g.w_out) * l.pitch + p % g.w_out;
    }
    for (int64_t b0 = o0; b0 < o1; b0 += kBlock) {
      const int64_t b1 = std::min(o1, b0 + kBlock);
      with_vecs(vecs, [&](auto kVecs) {
        interleaved_tile<T, decltype(kVecs)::value>(csr, bias, src, base, b0, b1, result);
      });
      for (int64_t o = b0; o < b1; ++o) {
        const T* r = reinterpret_cast<const T*>(result + (o - b0) * vecs);
        for (int v = 0; v < vecs; ++v) {
          const int64_t p = p0 + v;
          T* dst = out + n0 * on + o * oc + (p / g.w_out) * oh + (p % g.w_out) * ow;
          for (int64_t s = 0; s < count; ++s) dst[s * on] = r[v * lanes + s];
        }
      }
    }
  }
}

// Which of the first `count` lanes of the interleaved layout's `size` vectors are all finite.
template <typename T>
void interleaved_finite(const T* p, int64_t size, int64_t count, char* finite) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  V acc{};
  for (int64_t i = 0; i < size; ++i) {
    V x;
    std::memcpy(&x, p + i * lanes, sizeof(V));
    acc += x - x;
  }
  alignas(32) T t[lanes];
  std::memcpy(t, &acc, sizeof(V));
  for (int64_t s = 0; s < count; ++s) finite[s] = t[s] == T(0);
}

template <typename T>
void interleaved_conv_impl(const Csr<T>& csr, const at::Tensor& x, const T* bp, const Geometry& g,
                           const Layout& l, at::Tensor& out, std::vector<char>& finite) {
  constexpr int64_t lanes = Vec<T>::lanes;
  T* op = out.mutable_data_ptr<T>();
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  // The runs read up to one channel past the last and, from a position, at most one plane.
  const int64_t scratch = layout_size(g, l, 0) * lanes;
  const int64_t groups = (g.n + lanes - 1) / lanes, threads = at::get_num_threads();
  const int64_t data = g.c_in * l.channel;
  if (groups >= threads) {
    at::parallel_for(0, groups, 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> layout(scratch, T(0));
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n0 = j * lanes, count = std::min(lanes, g.n - n0);
        fill_interleaved<T>(x, n0, count, 0, g.c_in, g, l, layout.data());
        interleaved_finite(layout.data(), data, count, finite.data() + n0);
        interleaved_rows<T>(csr, bp, layout.data(), g, l, n0, count, 0, g.c_out, op, on, oc, oh, ow);
      }
    });
    return;
  }
  std::vector<T> layout(scratch, T(0));
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t n0 = j * lanes, count = std::min(lanes, g.n - n0);
    at::parallel_for(0, g.c_in, 1, [&](int64_t c0, int64_t c1) {
      fill_interleaved<T>(x, n0, count, c0, c1, g, l, layout.data());
    });
    interleaved_finite(layout.data(), data, count, finite.data() + n0);
    at::parallel_for(0, g.c_out, 1, [&](int64_t o0, int64_t o1) {
      interleaved_rows<T>(csr, bp, layout.data(), g, l, n0, count, o0, o1, op, on, oc, oh, ow);
    });
  }
}

// Sum of the lanes, in a fixed order.
template <typename T, typename V>
inline T lane_sum(V v) {
  alignas(32) T t[Vec<T>::lanes];
  std::memcpy(t, &v, sizeof(V));
  T s = 0;
  for (int64_t i = 0; i < Vec<T>::lanes; ++i) s += t[i];
  return s;
}

// acc[e] += the dot product of an output channel's gradient r with kept weight e's input, for
// the kept weights e of row o: vector i of the product pairs r[i * lanes] with the layout at
// off[e] * scale + at(i), for i in [0, count). Four kept weights share each load of r. Not
// inlined: inside its callers' loops GCC spills the four pointers of the inner loop to the stack
// (the interleaved weight gradient measured 1.25x slower at 8x8).
template <typename T, typename At>
__attribute__((noinline)) void kept_dots(const Csr<T>& csr, int64_t o, const T* r,
                                         const T* layout, int64_t scale, int64_t count, At at,
                                         T* acc) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  const int64_t* off = csr.offset.data();
  const int64_t end = csr.row[o + 1];
  int64_t e = csr.row[o];
  for (; e + 4 <= end; e += 4) {
    const T* p0 = layout + off[e] * scale;
    const T* p1 = layout + off[e + 1] * scale;
    const T* p2 = layout + off[e + 2] * scale;
    const T* p3 = layout + off[e + 3] * scale;
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t i = 0; i < count; ++i) {
      const int64_t f = at(i);
      V gv, v0, v1, v2, v3;
      std::memcpy(&gv, r + i * lanes, sizeof(V));
      std::memcpy(&v0, p0 + f, sizeof(V));
      std::memcpy(&v1, p1 + f, sizeof(V));
      std::memcpy(&v2, p2 + f, sizeof(V));
      std::memcpy(&v3, p3 + f, sizeof(V));
      a0 = multiply_add<T>(a0, gv, v0);
      a1 = multiply_add<T>(a1, gv, v1);
      a2 = multiply_add<T>(a2, gv, v2);
      a3 = multiply_add<T>(a3, gv, v3);
    }
    acc[e] += lane_sum<T>(a0);
    acc[e + 1] += lane_sum<T>(a1);
    acc[e + 2] += lane_sum<T>(a2);
    acc[e + 3] += lane_sum<T>(a3);
  }
  for (; e < end; ++e) {
    const T* pe = layout + off[e] * scale;
    V a{};
    for (int64_t i = 0; i < count; ++i) {
      V gv, v;
      std::memcpy(&gv, r + i * lanes, sizeof(V));
      std::memcpy(&v, pe + at(i), sizeof(V));
      a = multiply_add<T>(a, gv, v);
    }
    acc[e] += lane_sum<T>(a);
  }
}

// gw at the kept weights += the sums body(i0, i1, acc) adds into acc (one entry per kept
// weight) for the items [i0, i1) of [0, items): the items split over threads, each summing into
// a buffer of its own; the buffers are added in thread order (deterministic for a thread count).
template <typename T, typename Body>
void sum_over_threads(const Csr<T>& csr, int64_t kept, int64_t items, at::Tensor& gw, Body body) {
  std::vector<std::vector<T>> partial(at::get_num_threads());
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T>& acc = partial[at::get_thread_num()];
    if (acc.empty()) acc.assign(kept, T(0));  // a thread may take more than one range
    body(i0, i1, acc.data());
  });
  T* out = gw.mutable_data_ptr<T>();
  for (const std::vector<T>& acc : partial) {
    if (acc.empty()) continue;
    for (int64_t e = 0; e < kept; ++e) out[csr.flat[e]] += acc[e];
  }
}

// The weight gradient at the kept weights, gw[e] = sum over samples and output positions of
// grad[n, o, h, w] * (the input under kept weight e at (h, w)), as dot products in the layout:
// each output channel's gradient is laid out as a run of pitch `pitch` with zeros in the dropped
// columns, so it pairs with the same shifted input runs as the forward pass. Four kept weights
// of a row share each load of the gradient. Samples split over threads, each summing into its
// own buffer; the buffers are added in thread order.
template <typename T>
void weight_grad_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& mask, const Geometry& g, int64_t kept, at::Tensor& gw) {
  constexpr int64_t lanes = Vec<T>::lanes;
  const Layout l = layout_of(g);
  const Csr<T> csr = csr_of<T>(weight, mask, g, l, kept);
  const int64_t run = (l.run + lanes - 1) / lanes * lanes;
  const int64_t scratch = layout_size(g, l, run);
  const T* gp = grad.const_data_ptr<T>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gwd = grad.stride(3);
  sum_over_threads(csr, kept, g.n, gw, [&](int64_t n0, int64_t n1, T* acc) {
    std::vector<T> layout(scratch, T(0)), runs(g.c_out * run, T(0));
    const int64_t* off = csr.offset.data();
    for (int64_t n = n0; n < n1; ++n) {
      fill_layout<T>(x, n, 0, g.c_in, g, l, layout.data());
      if (!all_finite(layout.data(), g.c_in * l.channel)) {
        // inf or NaN in the sample: the dropped columns would meet them (0 * inf), so only the
        // output positions themselves are summed.
        for (int64_t o = 0; o < g.c_out; ++o) {
          for (int64_t e = csr.row[o]; e < csr.row[o + 1]; ++e) {
            T sum = 0;
            for (int64_t h = 0; h < g.h_out; ++h)
              for (int64_t w = 0; w < g.w_out; ++w)
                sum += gp[n * gn + o * gc + h * gh + w * gwd] * layout[off[e] + h * l.pitch + w];
            acc[e] += sum;
          }
        }
        continue;
      }
      for (int64_t o = 0; o < g.c_out; ++o) {
        T* r = runs.data() + o * run;
        for (int64_t h = 0; h < g.h_out; ++h)
          for (int64_t w = 0; w < g.w_out; ++w) r[h * l.pitch + w] = gp[n * gn + o * gc + h * gh + w * gwd];
      }
      for (int64_t o = 0; o < g.c_out; ++o)
        kept_dots<T>(csr, o, runs.data() + o * run, layout.data(), 1, run / lanes,
                     [&](int64_t i) { return i * lanes; }, acc);
    }
  });
}

// weight_grad_impl on the interleaved layout: the gradient of each group of samples is laid
// out as vectors of samples at the output positions, each kept weight's dot product runs over
// the output positions only (aligned loads, nothing dropped), and its lanes are summed per group.
// The lanes past the batch are zero in both layouts, so they add nothing.
template <typename T>
void interleaved_weight_grad_impl(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& mask,
                                  const Geometry& g, int64_t kept, at::Tensor& gw) {
  constexpr int64_t lanes = Vec<T>::lanes;
  const Layout l = layout_of(g);
  const Csr<T> csr = csr_of<T>(weight, mask, g, l, kept);
  const int64_t positions = g.h_out * g.w_out;
  std::vector<int64_t> base(positions);
  for (int64_t p = 0; p < positions; ++p) base[p] = ((p / g.w_out) * l.pitch + p % g.w_out) * lanes;
  const int64_t scratch = layout_size(g, l, 0) * lanes;
  const T* gp = grad.const_data_ptr<T>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gwd = grad.stride(3);
  const int64_t groups = (g.n + lanes - 1) / lanes;
  sum_over_threads(csr, kept, groups, gw, [&](int64_t j0, int64_t j1, T* acc) {
    std::vector<T> layout(scratch, T(0)), runs(g.c_out * positions * lanes, T(0));
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = j * lanes, count = std::min(lanes, g.n - n0);
      fill_interleaved<T>(x, n0, count, 0, g.c_in, g, l, layout.data(), count < lanes);
      for (int64_t o = 0; o < g.c_out; ++o) {
        T* r = runs.data() + o * positions * lanes;
        for (int64_t p = 0; p < positions; ++p) {
          const T* src = gp + n0 * gn + o * gc + (p / g.w_out) * gh + (p % g.w_out) * gwd;
          for (int64_t s = 0; s < count; ++s) r[p * lanes + s] = src[s * gn];
          for (int64_t s = count; s < lanes; ++s) r[p * lanes + s] = T(0);
        }
      }
      for (int64_t o = 0; o < g.c_out; ++o)
        kept_dots<T>(csr, o, runs.data() + o * positions * lanes, layout.data(), lanes, positions,
                     [&](int64_t i) { return base[i]; }, acc);
    }
  });
}

}  // namespace

void sparse_weight_grad_kernel(const at::Tensor& grad, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& mask,
                               const Geometry& g, int64_t kept, at::Tensor& gw) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (interleaved_layout(g, sizeof(T)))
      interleaved_weight_grad_impl<T>(grad, x, weight, mask, g, kept, gw);
    else
      weight_grad_impl<T>(grad, x, weight, mask, g, kept, gw);
  };
  if (x.scalar_type() == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
}

void sparse_conv_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                        const std::optional<at::Tensor>& bias, const Geometry& g, int64_t kept,
                        at::Tensor& out, std::vector<char>& finite) {
  if (x.scalar_type() == at::kDouble) {
    sparse_conv_impl<double>(x, weight, mask, bias, g, kept, out, finite);
  } else {
    sparse_conv_impl<float>(x, weight, mask, bias, g, kept, out, finite);
  }
}
PYPRUNE_ISA_END

#ifndef PYPRUNE_CPU_AVX2
PYPRUNE_CPU_DECLARE(void, sparse_conv_kernel, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const std::optional<at::Tensor>&,
                    const masked_conv::Geometry&, int64_t, at::Tensor&, std::vector<char>&)
PYPRUNE_CPU_DECLARE(void, sparse_weight_grad_kernel, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const masked_conv::Geometry&, int64_t,
                    at::Tensor&)

namespace pyprune {
namespace {

// Density limits (the fraction of the weight kept) under which the direct sparse kernels beat
// oneDNN on the masked weight. Measured on this project's CPU (2-core Xeon with AVX-512, float32,
// 3x3 convolutions, random masks, batch 32 and 64, C_in = C_out from 32 to 512 and, strided,
// C_out = 2 C_in; the sparse time fitted linearly between 5% and 20% kept): the crossing rises with the output size, where the
// kernel's zero-padded runs waste less, and falls with the reduction length C_in * kH * kW, where
// oneDNN is more efficient. Forward, stride 1, crossings per row below (output size >= 32x32 /
// >= 16x16 / >= 8x8 / smaller): K <= 288: 23-78% / 16-68% / 5-12% / 3-11%; K <= 576: 51-53% /
// 20-21% / 12% / 5-7%; K <= 1152: 22-26% / 18% / 12% / 5-6%; more: 16% / 16-20% / 11-12% / 5-8%.
// Forward + backward (the weight gradient at the kept weights, grad_x by the forward kernel on the
// transposed weight): 22-42% / 16-46% / 10-13% / 4-15% over all rows. Strided convolutions lay
// out s0 * s1 input positions per output position and grad_x stays dense there, so they gain
// less, and how much depends on the output channels that share each layout: at stride 2 with
// C_out = 2 C_in (a ResNet's downsampling layer) the forward crossings are 9-57% / 5-12% /
// 4-11% / 0-7% (rising with K as above), with C_out = C_in 16-24% at 32x32 for K > 288 and, for
// K > 576, 9-20% at 16x16 and 7-10% at 8x8, none elsewhere; the strided weight gradient gains
// less again. The limits sit at about 0.85x of the lowest crossing of each cell. Below 1024
// output positions per channel (batch x H_out x W_out) the mask scan is not amortised: the limits
// drop to a quarter, below 256 to zero. PYPRUNE_SPARSE_CONV=sparse or =dense forces a path (tests
// run both).
bool sparse_pays(const masked_conv::Geometry& g, double density, bool backward,
                 int64_t element_size) {
  if (const char* force = std::getenv("PYPRUNE_SPARSE_CONV")) {
    if (std::strcmp(force, "sparse") == 0) return true;
    if (std::strcmp(force, "dense") == 0) return false;
  }
  // [stride 1 / strided / strided with C_out >= 2 C_in][backward][row: reduction length]
  // [column: output size]
  static constexpr double kLimit[3][2][4][4] = {
      {{{0.2, 0.13, 0.045, 0.028}, {0.35, 0.17, 0.1, 0.042}, {0.18, 0.15, 0.1, 0.042},
        {0.135, 0.14, 0.09, 0.042}},
       {{0.2, 0.13, 0.08, 0.028}, {0.2, 0.15, 0.1, 0.034}, {0.2, 0.145, 0.1, 0.038},
        {0.19, 0.14, 0.09, 0.039}}},
      {{{0.0, 0.0, 0.0, 0.0}, {0.2, 0.0, 0.0, 0.0}, {0.14, 0.075, 0.06, 0.0},
        {0.14, 0.12, 0.08, 0.025}},
       {{0.2, 0.0, 0.0, 0.0}, {0.2, 0.0, 0.0, 0.0}, {0.2, 0.1, 0.0, 0.0},
        {0.17, 0.17, 0.0, 0.0}}},
      {{{0.075, 0.045, 0.035, 0.0}, {0.17, 0.1, 0.085, 0.035}, {0.15, 0.11, 0.075, 0.048},
        {0.115, 0.115, 0.1, 0.057}},
       {{0.115, 0.08, 0.024, 0.017}, {0.25, 0.084, 0.098, 0.032}, {0.22, 0.146, 0.109, 0.042},
        {0.18, 0.18, 0.118, 0.063}}}};
  const int64_t hw = g.h_out * g.w_out, positions = g.n * hw;
  if (positions < 256) return false;
  const int row = masked_conv::reduction_class(g);
  const int column = hw >= 1024 ? 0 : hw >= 256 ? 1 : hw >= 64 ? 2 : 3;
  const int kind = g.stride[0] * g.stride[1] == 1 ? 0 : g.c_out >= 2 * g.c_in ? 2 : 1;
  double limit = kLimit[kind][backward][row][column];
  // The limits above were measured on the run layout; the interleaved layout is faster where it
  // runs (interleaved_layout): forward 1.2-1.8x (see there), weight gradient 1.3-1.9x (1.58x at
  // 8x8, 1.91x at 4x4, 1.40x at 8x8 from stride 2, 1.27x at 12x12). The factors sit below the
  // speed-ups measured; a strided input gradient stays on the dense engine either way.
  if (interleaved_layout(g, element_size)) {
    static constexpr double kGain[2][2] = {{1.15, 1.3}, {1.15, 1.25}};  // [backward][strided]
    limit *= kGain[backward][kind != 0];
  }
  if (positions < 1024) limit /= 4;
  return density <= limit;
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_mask,
                    const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu): x must be a CPU tensor");
  TORCH_CHECK(weight_mask.scalar_type() == at::kBool && weight_mask.sizes() == weight.sizes(), op,
              ": weight_mask must be bool with weight's shape");
  TORCH_CHECK(weight_mask.device() == x.device() && weight.device() == x.device(), op,
              ": weight and weight_mask must be on x's device");
}

bool vectorized(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

// where(mask, t, 0) for a tensor and bool mask of one shape, in one pass over raw bits (torch.where
// costs 10x more here: 0.45 ms for a 128x128x3x3 weight); contiguous result.
template <typename Bits>
void keep_bits(const Bits* t, const bool* m, Bits* out, int64_t count) {
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = t[i] & (Bits(0) - Bits(m[i]));
  });
}

at::Tensor masked(const at::Tensor& t, const at::Tensor& mask) {
  const at::Tensor tc = t.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  const bool* m = mc.const_data_ptr<bool>();
  const int64_t count = t.numel();
  switch (t.element_size()) {
    case 2:
      keep_bits(static_cast<const uint16_t*>(tc.const_data_ptr()), m,
                static_cast<uint16_t*>(out.data_ptr()), count);
      break;
    case 4:
      keep_bits(static_cast<const uint32_t*>(tc.const_data_ptr()), m,
                static_cast<uint32_t*>(out.data_ptr()), count);
      break;
    default:
      keep_bits(static_cast<const uint64_t*>(tc.const_data_ptr()), m,
                static_cast<uint64_t*>(out.data_ptr()), count);
  }
  return out;
}

// The number of true entries of a bool tensor (bytes 0 or 1), eight at a time.
int64_t count_true(const at::Tensor& mask) {
  const at::Tensor mc = mask.contiguous();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(mc.const_data_ptr<bool>());
  const int64_t count = mc.numel();
  int64_t total = 0, i = 0;
  for (; i + 8 <= count; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, 8);
    total += __builtin_popcountll(word);  // each byte holds 0 or 1
  }
  for (; i < count; ++i) total += p[i];
  return total;
}

// The forward on checked operands; kept = the number of true entries of weight_mask.
at::Tensor sparse_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_mask,
                          int64_t kept, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const masked_conv::Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, 1);
  const double density = weight.numel() == 0 ? 0.0 : double(kept) / double(weight.numel());
  if (!vectorized(x) || !sparse_pays(g, density, false, x.element_size()))
    return at::conv2d(x, masked(weight, weight_mask), bias, stride, padding, dilation, 1);
  at::Tensor out = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options(), x.suggest_memory_format());
  if (out.numel() == 0) return out;
  std::vector<char> finite(g.n, 1);
  PYPRUNE_CPU_KERNEL(sparse_conv_kernel, x, weight, weight_mask, bias, g, kept, out, finite);
  // Samples with inf or NaN: the dense engine, so that 0 * inf at masked weights gives NaN as
  // in conv2d(x, weight * weight_mask).
  at::Tensor w;
  for (int64_t n = 0; n < g.n; ++n) {
    if (finite[n]) continue;
    if (!w.defined()) w = masked(weight, weight_mask);
    out.narrow(0, n, 1).copy_(at::conv2d(x.narrow(0, n, 1), w, bias, stride, padding, dilation, 1));
  }
  return out;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_mask, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const masked_conv::Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, 1);
  check_operands(x, weight, weight_mask, "_sparse_conv2d");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.c_out && bias->scalar_type() == x.scalar_type(),
                "_sparse_conv2d: bias must have shape (C_out,) and x's dtype");
  return sparse_forward(x, weight, weight_mask, count_true(weight_mask), bias, stride, padding,
                        dilation);
}

// (grad_x, grad_weight) of _sparse_conv2d, each only if asked for (else an empty tensor).
// grad_weight: the kept weights' dot products (sparse_weight_grad_kernel) where sparse_pays, else
// the dense engine's, masked. grad_x: for stride 1 (and padding <= the dilated kernel's reach)
// the forward convolution of grad with the transposed, flipped weight and mask, so the same
// density rule and kernel apply; otherwise the dense engine's.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& weight_mask, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool x_grad, bool weight_grad) {
  const masked_conv::Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, 1);
  check_operands(x, weight, weight_mask, "_sparse_conv2d_backward");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.n, g.c_out, g.h_out, g.w_out}) &&
                  grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "_sparse_conv2d_backward: grad must have the output's shape, dtype and device");
  const int64_t kept = count_true(weight_mask);
  const double density = weight.numel() == 0 ? 0.0 : double(kept) / double(weight.numel());
  const bool sparse = vectorized(x) && sparse_pays(g, density, true, x.element_size()) && g.n > 0;
  const bool transposable = masked_conv::transposable(g);
  at::Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, weight.options());
  const bool dense_x = x_grad && !(sparse && transposable);
  const bool dense_w = weight_grad && !sparse;
  if (dense_x || dense_w) {
    auto [dx, dw, unused] = at::convolution_backward(
        grad, x, masked(weight, weight_mask), std::nullopt, stride, padding, dilation, false,
        {0, 0}, 1, {dense_x, dense_w, false});
    if (dense_x) gx = dx.contiguous(x.suggest_memory_format());
    if (dense_w) gw = masked(dw, weight_mask).contiguous();
  }
  if (x_grad && !dense_x) {
    const masked_conv::Transposed t = masked_conv::transposed(grad, weight, g);
    const at::Tensor mt = weight_mask.transpose(0, 1).flip({2, 3}).contiguous();
    gx = sparse_forward(grad.contiguous(x.suggest_memory_format()), t.weight, mt, kept,
                        std::nullopt, {1, 1}, t.geometry.padding, dilation)
             .contiguous(x.suggest_memory_format());
  }
  if (weight_grad && !dense_w) {
    gw = at::zeros(weight.sizes(), weight.options());
    PYPRUNE_CPU_KERNEL(sparse_weight_grad_kernel, grad, x, weight, weight_mask, g, kept, gw);
  }
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("_sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("_sparse_conv2d_backward", &sparse_conv2d_backward_cpu);
}

}  // namespace pyprune
#endif  // PYPRUNE_CPU_AVX2
