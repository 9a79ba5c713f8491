// Masked convolution on the CPU (contract: csrc/ops.cpp, csrc/masked_conv.h).
//
// Static masks ((C,) or none): oneDNN runs once on the smaller problem the masks leave
// (masked_conv::static_forward). Per-sample masks ((N, C), dynamic channel gating): the batch is
// split over threads and each sample runs its own smaller problem: the sample's kept input
// channels against the weight's kept rows and columns, written into its kept output channels
// while the masked ones are zero-filled. The engine runs single-threaded inside the parallel
// region, so the threads never share a problem. Backward does the same per sample; each thread
// adds its samples' weight and bias gradients into a buffer of its own, summed at the end.
// Where this would be slower than the batch (much kept, small outputs: per_sample_pays) and for
// groups > 1, the dense engine runs with the masks applied around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../masked_conv.h"

namespace pyprune {
namespace {

using masked_conv::Geometry;

// dst[n, c] = src[n, map[c]] for map[c] >= 0, else 0, for (N, C, H, W) tensors of one dtype
// and any strides: the channel gather and the scatter-with-zero-fill of the masked kernels, one
// write per element of dst. Values are moved as raw bits (all-zero bits are +0.0).
template <typename T>
void move_channels_impl(const at::Tensor& src, const at::Tensor& dst, const int64_t* map) {
  const int64_t N = dst.size(0), C = dst.size(1), H = dst.size(2), W = dst.size(3);
  const T* s = static_cast<const T*>(src.data_ptr());
  T* d = static_cast<T*>(dst.data_ptr());
  const auto ss = src.strides(), ds = dst.strides();
  if (ds[1] == 1 && C > 1) {  // channels innermost: per pixel, zero-fill then copy the kept
    std::vector<int64_t> dst_c, src_off;
    for (int64_t c = 0; c < C; ++c) {
      if (map[c] < 0) continue;
      dst_c.push_back(c);
      src_off.push_back(map[c] * ss[1]);
    }
    const bool fill = static_cast<int64_t>(dst_c.size()) < C;
    const int64_t kept = static_cast<int64_t>(dst_c.size());
    at::parallel_for(0, N * H * W, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / (H * W), h = p / W % H, w = p % W;
        T* dp = d + n * ds[0] + h * ds[2] + w * ds[3];
        const T* sp = s + n * ss[0] + h * ss[2] + w * ss[3];
        if (fill) std::memset(dp, 0, C * sizeof(T));
        for (int64_t t = 0; t < kept; ++t) dp[dst_c[t]] = sp[src_off[t]];
      }
    });
    return;
  }
  at::parallel_for(0, N * C, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / C, c = r % C;
      T* dp = d + n * ds[0] + c * ds[1];
      const T* sp = map[c] >= 0 ? s + n * ss[0] + map[c] * ss[1] : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        T* drow = dp + h * ds[2];
        if (sp == nullptr) {
          if (ds[3] == 1) std::memset(drow, 0, W * sizeof(T));
          else for (int64_t w = 0; w < W; ++w) drow[w * ds[3]] = T(0);
          continue;
        }
        const T* srow = sp + h * ss[2];
        if (ds[3] == 1 && ss[3] == 1) std::memcpy(drow, srow, W * sizeof(T));
        else for (int64_t w = 0; w < W; ++w) drow[w * ds[3]] = srow[w * ss[3]];
      }
    }
  });
}

void move_channels(const at::Tensor& src, const at::Tensor& dst, const int64_t* map) {
  TORCH_INTERNAL_ASSERT(src.scalar_type() == dst.scalar_type() && src.dim() == 4 && dst.dim() == 4);
  switch (dst.element_size()) {
    case 2: return move_channels_impl<uint16_t>(src, dst, map);
    case 4: return move_channels_impl<uint32_t>(src, dst, map);
    case 8: return move_channels_impl<uint64_t>(src, dst, map);
    default: TORCH_CHECK(false, "masked_conv2d: unsupported element size ", dst.element_size());
  }
}

// y[n, c] = 0 where the mask (row n of a 2-D mask, or the 1-D one) drops channel c, in place.
// For NCHW y only the dropped channels are written (masked_fill_ would pass over all of y).
void zero_channels(at::Tensor& y, const at::Tensor& mask) {
  const at::Tensor m = mask.dim() == 1 ? mask.view({1, -1}) : mask;
  if (!y.is_contiguous()) {
    y.masked_fill_(m.view({m.size(0), m.size(1), 1, 1}).logical_not(), 0);
    return;
  }
  const int64_t C = y.size(1), plane = y.size(2) * y.size(3) * y.element_size();
  const int64_t ms0 = m.size(0) == 1 ? 0 : m.stride(0), ms1 = m.stride(1);
  const bool* mp = m.data_ptr<bool>();
  char* yp = static_cast<char*>(y.data_ptr());
  at::parallel_for(0, y.size(0) * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      if (!mp[(r / C) * ms0 + (r % C) * ms1]) std::memset(yp + r * plane, 0, plane);
  });
}

// The position of each of `channels` channels among `index` (-1 if absent), range-checked.
std::vector<int64_t> positions(const at::Tensor& index, int64_t channels, const char* what) {
  const at::Tensor idx = index.contiguous();
  std::vector<int64_t> position(channels, -1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.size(0); ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < channels, "_channel_conv: ", what, " index ", ip[j],
                " out of range for ", channels, " channels");
    position[ip[j]] = j;
  }
  return position;
}

// t's channels `index` (dim 1), range-checked, laid out in format: one pass, written once.
at::Tensor gather_channels(const at::Tensor& t, const at::Tensor& index, at::MemoryFormat format) {
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.size(0); ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < t.size(1), "_channel_conv: in index ", ip[j],
                " out of range for ", t.size(1), " channels");
  at::Tensor out = at::empty({t.size(0), idx.size(0), t.size(2), t.size(3)}, t.options(), format);
  move_channels(t, out, ip);
  return out;
}

// _channel_conv on the CPU. When input channels are gathered anyway, they are written
// channels_last, oneDNN's native layout (measured 1.1x-3x faster than NCHW convolutions here,
// most at odd channel counts, which masks produce); the scatter of the kept outputs then writes
// x's layout. Without an input gather, the engine runs in x's layout (a conversion would cost
// more than it saves).
at::Tensor channel_conv_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation,
                            const std::optional<at::Tensor>& in_index,
                            const std::optional<at::Tensor>& out_index, int64_t channels) {
  TORCH_CHECK(x.device().is_cpu(), "_channel_conv (cpu): x must be a CPU tensor");
  masked_conv::check_indices(x, weight, channels, in_index, out_index);
  const Geometry g = masked_conv::compact_geometry(x, weight, channels, stride, padding, dilation);
  const auto format = x.suggest_memory_format();
  const auto engine = in_index.has_value() ? at::MemoryFormat::ChannelsLast : format;
  at::Tensor y = masked_conv::compact_conv(x, weight, bias, g, in_index.value_or(at::Tensor()),
                                           engine, gather_channels);
  if (!out_index.has_value()) return y.contiguous(format);
  at::Tensor out = at::empty({g.n, channels, g.h_out, g.w_out}, x.options(), format);
  move_channels(y, out, positions(*out_index, channels, "out").data());
  return out;
}

// Kept channel indices of sample n (row n of a 2-D mask, the 1-D mask, or all), and the map
// from each channel to its position among the kept ones (-1 if dropped).
struct Channels {
  at::Tensor kept;
  std::vector<int64_t> position;
  bool all() const { return kept.size(0) == static_cast<int64_t>(position.size()); }
};

Channels channels_of(const std::optional<at::Tensor>& mask, int64_t n, int64_t c) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  Channels ch{at::Tensor(), std::vector<int64_t>(c)};
  if (!mask.has_value()) {
    ch.kept = at::arange(c, opts);
    for (int64_t i = 0; i < c; ++i) ch.position[i] = i;
    return ch;
  }
  const at::Tensor row = mask->dim() == 2 ? mask->select(0, n) : *mask;
  const bool* m = row.data_ptr<bool>();
  const int64_t step = row.stride(0);
  int64_t k = 0;
  for (int64_t i = 0; i < c; ++i) ch.position[i] = m[i * step] ? k++ : -1;
  ch.kept = at::empty({k}, opts);
  int64_t* kp = ch.kept.data_ptr<int64_t>();
  for (int64_t i = 0; i < c; ++i)
    if (ch.position[i] >= 0) kp[ch.position[i]] = i;
  return ch;
}

// The sample's smaller problem: x's kept channels (1, k_in, H, W) and weight (k_out, k_in, kh, kw).
struct Problem {
  at::Tensor x, weight;
};

Problem problem_of(const at::Tensor& x, const at::Tensor& weight, int64_t n, const Channels& in,
                   const Channels& out) {
  at::Tensor xs = x.narrow(0, n, 1);
  at::Tensor w = out.all() ? weight : weight.index_select(0, out.kept);
  if (!in.all()) {
    xs = gather_channels(xs, in.kept, xs.suggest_memory_format());
    w = w.index_select(1, in.kept);
  }
  return {xs, w.contiguous()};
}

// Whether running each sample's kept channels beats one dense batched convolution with the
// masks applied around it. A single sample's convolution runs the engine less efficiently the
// smaller its output and the shorter its reduction (C_in x kH x kW), and gathering each sample's
// weight rows costs memory traffic that small outputs do not amortise. So the per-sample path
// runs when the work it keeps, the mean over samples of (kept inputs x kept outputs) /
// (C_in x C_out), is at most a limit by output size and reduction length. Measured on this
// project's CPU (3x3, C_in = C_out, batch 32 and 64, per-sample output masks keeping 25/50/75%;
// dense time / per-sample time): at 32x32 outputs 1.3-3.6x at 75% for C >= 64, while C = 32 at
// batch 64 loses at 25% already (0.87x, oneDNN's batched kernel is unusually fast there); at
// 14x14-16x16 the crossing is ~0.3 for C = 64 (batch 64), 0.6-0.7 for C = 128, 0.7-0.75 for
// C >= 256; at 8x8 below 25% for C = 64, ~25% for C = 128, ~45% for C >= 256; at 4x4 below 25%
// for every C. The per-sample backward adds a weight-gradient buffer per thread and scattered
// adds into it: it pays at less kept work (25% of 128x16x16 1.4x faster, 50% 0.85x) and not at
// all below 128 output positions (8x8 at 25%: 0.6x).
// PYPRUNE_MASKED_CONV_CPU=per_sample or =dense forces a path (tests run both).
bool per_sample_pays(const Geometry& g, const std::optional<at::Tensor>& in_mask,
                     const std::optional<at::Tensor>& out_mask, bool backward) {
  if (const char* force = std::getenv("PYPRUNE_MASKED_CONV_CPU")) {
    if (std::strcmp(force, "per_sample") == 0) return true;
    if (std::strcmp(force, "dense") == 0) return false;
  }
  // [row: reduction length <= 288, <= 576, <= 1152, more][column: output >= 512, >= 128, >= 48]
  static constexpr double kLimit[4][3] = {
      {0.0, 0.0, 0.0}, {0.9, 0.2, 0.0}, {0.9, 0.55, 0.15}, {0.9, 0.6, 0.38}};
  const int64_t hw = g.h_out * g.w_out;
  const int row = masked_conv::reduction_class(g);
  double limit = hw >= 512 ? kLimit[row][0] : hw >= 128 ? kLimit[row][1]
                 : hw >= 48 ? kLimit[row][2] : 0.0;
  if (backward) limit = hw >= 128 ? 0.6 * limit : 0.0;
  if (limit == 0.0 || g.n == 0) return false;
  auto kept_per_sample = [&](const std::optional<at::Tensor>& mask, int64_t c) {
    if (!mask.has_value()) return at::full({g.n}, 1.0, at::kDouble);
    at::Tensor k = mask->to(at::kDouble).sum(-1) / static_cast<double>(c);
    return mask->dim() == 1 ? k.expand({g.n}) : k;
  };
  const double work = (kept_per_sample(in_mask, g.c_in) * kept_per_sample(out_mask, g.c_out))
                          .mean()
                          .item<double>();
  return work <= limit;
}

void check(const at::Tensor& x, const Geometry& g, const std::optional<at::Tensor>& in_mask,
           const std::optional<at::Tensor>& out_mask) {
  TORCH_CHECK(x.device().is_cpu(), "masked_conv2d (cpu): x must be a CPU tensor");
  masked_conv::check_mask(in_mask, g.n, g.c_in, x, "in_mask");
  masked_conv::check_mask(out_mask, g.n, g.c_out, x, "out_mask");
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             const std::optional<at::Tensor>& in_mask,
                             const std::optional<at::Tensor>& out_mask) {
  const Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, groups);
  check(x, g, in_mask, out_mask);
  // Without input channels the dense engine returns no output channels; the compact and
  // per-sample paths give the bias.
  if (groups > 1 && g.c_in > 0)
    return masked_conv::dense_forward(x, weight, bias, g, in_mask, out_mask);
  if (!masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask)) {
    const masked_conv::Compacted c = masked_conv::compact(x, weight, bias, g, in_mask, out_mask);
    return channel_conv_cpu(x, c.weight, c.bias, g.stride, g.padding, g.dilation, c.in_index,
                            c.out_index, g.c_out);
  }
  if (g.c_in > 0 && !per_sample_pays(g, in_mask, out_mask, false)) {
    // The masked input channels zeroed by a channel copy (torch.where is several times slower
    // here), then the batched engine.
    at::Tensor xm = x;
    if (in_mask.has_value()) {
      xm = at::empty_like(x, x.suggest_memory_format());
      for (int64_t n = 0; n < g.n; ++n) {
        const Channels in = channels_of(in_mask, n, g.c_in);
        std::vector<int64_t> map(g.c_in);
        for (int64_t c = 0; c < g.c_in; ++c) map[c] = in.position[c] >= 0 ? c : -1;
        move_channels(x.narrow(0, n, 1), xm.narrow(0, n, 1), map.data());
      }
    }
    at::Tensor y = masked_conv::dense_forward(xm, weight, bias, g, std::nullopt, std::nullopt);
    if (out_mask.has_value()) zero_channels(y, *out_mask);
    return y;
  }

  const auto format = x.suggest_memory_format();
  at::Tensor out = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options(), format);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Channels in = channels_of(in_mask, n, g.c_in);
      const Channels oc = channels_of(out_mask, n, g.c_out);
      at::Tensor o = out.narrow(0, n, 1);
      const int64_t k_out = oc.kept.size(0);
      std::optional<at::Tensor> b;
      if (bias.has_value()) b = oc.all() ? *bias : bias->index_select(0, oc.kept);
      at::Tensor y;
      if (k_out == 0) {
        y = at::empty({1, 0, g.h_out, g.w_out}, x.options());
      } else if (in.kept.size(0) == 0) {
        y = b.has_value() ? b->view({1, -1, 1, 1}).expand({1, k_out, g.h_out, g.w_out})
                          : at::zeros({1, k_out, g.h_out, g.w_out}, x.options());
      } else {
        const Problem p = problem_of(x, weight, n, in, oc);
        y = at::conv2d(p.x, p.weight, b, g.stride, g.padding, g.dilation, 1);
      }
      move_channels(y, o, oc.position.data());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask) {
  const Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, groups);
  check(x, g, in_mask, out_mask);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.n, g.c_out, g.h_out, g.w_out}),
              "masked_conv2d backward: grad must have the output's shape");
  if (groups > 1 && g.c_in > 0)
    return masked_conv::dense_backward(grad, x, weight, g, in_mask, out_mask);
  if (!masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask))
    return masked_conv::static_backward(grad, x, weight, g, in_mask, out_mask);
  if (g.c_in > 0 && !per_sample_pays(g, in_mask, out_mask, true))
    return masked_conv::dense_backward(grad, x, weight, g, in_mask, out_mask);

  const auto format = x.suggest_memory_format();
  at::Tensor grad_x = at::empty_like(x, format);
  // Weight and bias gradients accumulate in float32 (double for double) per thread.
  const auto acc = weight.options().dtype(weight.scalar_type() == at::kDouble ? at::kDouble
                                                                              : at::kFloat);
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> grad_w(threads), grad_b(threads);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    const int t = at::get_thread_num();
    if (!grad_w[t].defined()) {
      grad_w[t] = at::zeros(weight.sizes(), acc);
      grad_b[t] = at::zeros({g.c_out}, acc);
    }
    for (int64_t n = begin; n < end; ++n) {
      const Channels in = channels_of(in_mask, n, g.c_in);
      const Channels oc = channels_of(out_mask, n, g.c_out);
      at::Tensor gx = grad_x.narrow(0, n, 1);
      if (oc.kept.size(0) == 0 || in.kept.size(0) == 0) gx.zero_();
      if (oc.kept.size(0) == 0) continue;
      at::Tensor gy = grad.narrow(0, n, 1);
      if (!oc.all()) gy = gather_channels(gy, oc.kept, gy.suggest_memory_format());
      grad_b[t].index_add_(0, oc.kept, gy.sum({0, 2, 3}).to(acc.dtype()));
      if (in.kept.size(0) == 0) continue;
      const Problem p = problem_of(x, weight, n, in, oc);
      auto [gxs, gws, unused] = at::convolution_backward(
          gy.contiguous(p.x.suggest_memory_format()), p.x, p.weight, std::nullopt, g.stride,
          g.padding, g.dilation, false, {0, 0}, 1, {true, true, false});
      move_channels(gxs, gx, in.position.data());
      grad_w[t].index_put_({oc.kept.view({-1, 1}), in.kept.view({1, -1})}, gws.to(acc.dtype()),
                           /*accumulate=*/true);
    }
  });
  at::Tensor gw = at::zeros(weight.sizes(), acc), gb = at::zeros({g.c_out}, acc);
  for (int t = 0; t < threads; ++t) {
    if (!grad_w[t].defined()) continue;
    gw.add_(grad_w[t]);
    gb.add_(grad_b[t]);
  }
  return {grad_x, gw.to(weight.scalar_type()), gb.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("_masked_conv2d_backward", &masked_conv2d_backward_cpu);
  m.impl("_channel_conv", &channel_conv_cpu);
}

}  // namespace pyprune
