// Masked convolution pieces shared by the CPU and CUDA kernels: argument checks, the output
// geometry, and the static-mask path, which runs the device's dense engine (oneDNN on the CPU,
// cuDNN on CUDA) on the smaller problem that the masks leave.
//
// out = conv2d(x * in_mask, weight, bias) * out_mask with boolean channel masks: in_mask (C_in,)
// or (N, C_in), out_mask (C_out,) or (N, C_out), either may be undefined (all kept). A masked
// input channel takes no part (inf or NaN in it do not leak); a masked output channel is exactly
// 0, bias included.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

namespace pyprune {
namespace masked_conv {

struct Geometry {
  int64_t n, c_in, h, w, c_out, kh, kw, h_out, w_out;
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

// The geometry of x (N, C_in, H, W) convolved with a (., ., kh, kw) weight into c_out channels;
// `op` names the operator in error messages.
inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t c_out,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D, got ", weight.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two values each");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype");
  Geometry g;
  g.n = x.size(0);
  g.c_in = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.c_out = c_out;
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.groups = groups;
  for (int i = 0; i < 2; ++i) {
    g.stride[i] = stride[i];
    g.padding[i] = padding[i];
    g.dilation[i] = dilation[i];
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, op,
                ": stride and dilation must be >= 1 and padding >= 0");
  }
  g.h_out = (g.h + 2 * g.padding[0] - g.dilation[0] * (g.kh - 1) - 1) / g.stride[0] + 1;
  g.w_out = (g.w + 2 * g.padding[1] - g.dilation[1] * (g.kw - 1) - 1) / g.stride[1] + 1;
  TORCH_CHECK(g.h_out >= 1 && g.w_out >= 1, op, ": the output would be empty (", g.h_out, "x",
              g.w_out, ")");
  return g;
}

inline Geometry geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "masked_conv2d: x and weight must be 4-D");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0,
              "masked_conv2d: groups must divide the input and output channels");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), "masked_conv2d: weight expects ",
              weight.size(1) * groups, " input channels, x has ", x.size(1));
  return make_geometry(x, weight, weight.size(0), stride, padding, dilation, groups,
                       "masked_conv2d");
}

// Geometry of a convolution of x with an already compacted weight (k_out, k_in, kh, kw) whose
// output has `channels` channels in all (the kept ones scattered among them).
inline Geometry compact_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t channels,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  return make_geometry(x, weight, channels, stride, padding, dilation, 1, "_channel_conv");
}

// Checks of _channel_conv's index arguments against the compacted weight.
inline void check_indices(const at::Tensor& x, const at::Tensor& weight, int64_t channels,
                          const std::optional<at::Tensor>& in_index,
                          const std::optional<at::Tensor>& out_index) {
  for (const auto* idx : {&in_index, &out_index}) {
    if (idx->has_value())
      TORCH_CHECK((*idx)->dim() == 1 && (*idx)->scalar_type() == at::kLong &&
                      (*idx)->device() == x.device(),
                  "_channel_conv: indices must be 1-D int64 tensors on x's device");
  }
  TORCH_CHECK(in_index.has_value() ? in_index->size(0) == weight.size(1)
                                   : x.size(1) == weight.size(1),
              "_channel_conv: weight must have one input channel per kept input channel");
  TORCH_CHECK(out_index.has_value() ? out_index->size(0) == weight.size(0)
                                    : channels == weight.size(0),
              "_channel_conv: weight must have one row per kept output channel");
}

// A channel mask: (C,) or (N, C) on x's device, bool (structural), or also x's dtype (soft)
// where the op takes soft masks (soft_ok).
inline void check_mask(const std::optional<at::Tensor>& mask, int64_t n, int64_t c,
                       const at::Tensor& x, const char* name, bool soft_ok = false) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  if (soft_ok) {
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(),
                "masked_conv2d: ", name, " must be bool or x's dtype (", x.scalar_type(),
                "), got ", m.scalar_type());
  } else {
    TORCH_CHECK(m.scalar_type() == at::kBool, "masked_conv2d: ", name, " must be bool, got ",
                m.scalar_type());
  }
  TORCH_CHECK(m.device() == x.device(), "masked_conv2d: ", name, " must be on x's device");
  TORCH_CHECK((m.dim() == 1 && m.size(0) == c) || (m.dim() == 2 && m.size(0) == n && m.size(1) == c),
              "masked_conv2d: ", name, " must have shape (", c, ",) or (", n, ", ", c, ")");
}

inline bool per_sample(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->dim() == 2;
}

// Mask as (N or 1, C, 1, 1) for torch.where, or undefined.
inline at::Tensor channel_view(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return {};
  return mask->dim() == 1 ? mask->view({1, -1, 1, 1})
                          : mask->view({mask->size(0), mask->size(1), 1, 1});
}

inline at::Tensor where(const at::Tensor& mask, const at::Tensor& t) {
  // A scalar zero (where.ScalarOther): no zero tensor made, so no fill launch on the GPU.
  return mask.defined() ? at::where(mask, t, at::Scalar(0.0)) : t;
}

// Masks applied around the dense convolution: the engine does all the work. Used for groups > 1
// and by backends for the cases they do not specialise.
inline at::Tensor dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const Geometry& g,
                                const std::optional<at::Tensor>& in_mask,
                                const std::optional<at::Tensor>& out_mask) {
  at::Tensor y = at::conv2d(where(channel_view(in_mask), x), weight, bias, g.stride, g.padding,
                            g.dilation, g.groups);
  if (out_mask.has_value()) y.masked_fill_(channel_view(out_mask).logical_not(), 0);  // in place
  return y;
}

// (grad_x, grad_weight, grad_bias) of dense_forward.
// x_grad false leaves grad_x undefined (for callers that compute it otherwise).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const Geometry& g,
    const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
    bool x_grad = true) {
  const at::Tensor in_m = channel_view(in_mask);
  auto [gx, gw, gb] = at::convolution_backward(
      where(channel_view(out_mask), grad), where(in_m, x), weight,
      at::OptionalIntArrayRef(at::IntArrayRef{g.c_out}), g.stride, g.padding, g.dilation, false,
      {0, 0}, g.groups, {x_grad, true, true});
  return {x_grad ? where(in_m, gx) : gx, gw, gb};
}

// The reduction-length class of a convolution, C_in x kH x kW <= 288, <= 576, <= 1152 or more
// (3x3 with C_in up to 32, 64, 128, more): the rows of the CPU's measured path-choice tables
// (sparse_pays in cpu/sparse_conv.cpp, per_sample_pays in cpu/masked_conv.cpp).
inline int reduction_class(const Geometry& g) {
  const int64_t k = g.c_in * g.kh * g.kw;
  return k <= 288 ? 0 : k <= 576 ? 1 : k <= 1152 ? 2 : 3;
}

// Whether grad_x of the convolution is a stride-1 convolution of grad with the transposed,
// flipped weight: stride 1, groups 1 and padding within the dilated kernel's reach.
inline bool transposable(const Geometry& g) {
  return g.groups == 1 && g.stride[0] == 1 && g.stride[1] == 1 &&
         g.padding[0] <= g.dilation[0] * (g.kh - 1) && g.padding[1] <= g.dilation[1] * (g.kw - 1);
}

// That convolution: weight (C_in, C_out, kh, kw) flipped, over grad, padding d * (k - 1) - p;
// its output has x's size.
struct Transposed {
  at::Tensor weight;
  Geometry geometry;
};

inline Transposed transposed(const at::Tensor& grad, const at::Tensor& weight, const Geometry& g) {
  Transposed t;
  t.weight = weight.transpose(0, 1).flip({2, 3}).contiguous();
  const std::array<int64_t, 2> padding = {g.dilation[0] * (g.kh - 1) - g.padding[0],
                                          g.dilation[1] * (g.kw - 1) - g.padding[1]};
  t.geometry = make_geometry(grad, t.weight, g.c_in, {1, 1}, padding, g.dilation, 1,
                             "masked_conv2d backward");
  return t;
}

// Kept-channel indices of 1-D device masks, computed once per mask version. nonzero() on a
// device is a host synchronisation (its output is sized by the mask's values) and CUDA graph
// capture forbids it; a layer's mask changes rarely, so its indices are looked up by the mask's
// storage, offset, size, stride and version counter. An entry holds the mask's storage, so no
// other mask can be allocated at its address while the entry exists; a mask changed in place
// through .data (which bypasses the version counter) is not seen, as in PyTorch's own caches.
// Inference tensors have no version counter: their indices are computed on every call.
class KeptIndexCache {
 public:
  static KeptIndexCache& instance() {
    static KeptIndexCache cache;
    return cache;
  }

  // The cached indices of `mask`, or an undefined tensor.
  at::Tensor find(const at::Tensor& mask) {
    if (mask.is_inference()) return at::Tensor();
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (matches(*it, mask)) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return it->index;
      }
    }
    return at::Tensor();
  }

  at::Tensor get(const at::Tensor& mask) {
    at::Tensor index = find(mask);
    if (index.defined()) return index;
    index = mask.nonzero().view({-1});
    if (mask.is_inference()) return index;
    const std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front({mask.storage(), mask.storage_offset(), mask.size(0), mask.stride(0),
                         mask._version(), index});
    if (entries_.size() > kCapacity) entries_.pop_back();
    return index;
  }

 private:
  static constexpr size_t kCapacity = 256;  // masks; a few KB of indices at most
  struct Entry {
    c10::Storage storage;
    int64_t offset, size, stride, version;
    at::Tensor index;
  };

  static bool matches(const Entry& e, const at::Tensor& mask) {
    return e.storage.unsafeGetStorageImpl() == mask.storage().unsafeGetStorageImpl() &&
           e.offset == mask.storage_offset() && e.size == mask.size(0) &&
           e.stride == mask.stride(0) && e.version == mask._version() &&
           e.index.device() == mask.device();
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
};

// Indices of the kept channels (all of them for an undefined mask); 1-D masks only. On a device
// they come from KeptIndexCache (no synchronisation once a mask version has been seen).
inline at::Tensor kept(const std::optional<at::Tensor>& mask, int64_t c, const at::Tensor& x) {
  if (!mask.has_value()) return at::arange(c, x.options().dtype(at::kLong));
  if (mask->device().is_cpu()) return mask->nonzero().view({-1});
  return KeptIndexCache::instance().get(*mask);
}

// Whether kept() would answer without a synchronisation.
inline bool kept_known(const std::optional<at::Tensor>& mask) {
  return !mask.has_value() || mask->device().is_cpu() ||
         KeptIndexCache::instance().find(*mask).defined();
}

// The static-mask convolution on compacted operands: x's channels in_index (all of them if
// undefined) against weight (k_out, k_in, kh, kw) and bias (k_out,), both already reduced to
// the kept channels. Returns (N, k_out, H_out, W_out) in `format`, the layout the engine runs
// in. gather(t, index, format) returns t's channels `index` (dim 1) laid out in format.
template <typename Gather>
at::Tensor compact_conv(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const Geometry& g,
                        const at::Tensor& in_index, at::MemoryFormat format, Gather gather) {
  const int64_t k_out = weight.size(0);
  if (g.n == 0 || k_out == 0) {
    return at::empty({g.n, k_out, g.h_out, g.w_out}, x.options(), format);
  }
  // Nothing reaches the output but the bias: no input channel kept, or none to begin with (the
  // engine would return no output channels there).
  if (weight.size(1) == 0) {
    at::Tensor y = at::empty({g.n, k_out, g.h_out, g.w_out}, x.options(), format);
    if (bias.has_value()) y.copy_(bias->view({1, -1, 1, 1}));
    else y.zero_();
    return y;
  }
  const at::Tensor xs = in_index.defined() ? gather(x, in_index, format) : x.contiguous(format);
  return at::conv2d(xs, weight.contiguous(format), bias, g.stride, g.padding, g.dilation, 1)
      .contiguous(format);
}

// The kept channels' weight (k_out, k_in, kh, kw) and bias, and the kept channel indices
// (none where a mask is absent: all kept), as _channel_conv takes them.
struct Compacted {
  at::Tensor weight;
  std::optional<at::Tensor> bias, in_index, out_index;
};

inline Compacted compact(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const Geometry& g,
                         const std::optional<at::Tensor>& in_mask,
                         const std::optional<at::Tensor>& out_mask) {
  Compacted c{weight, bias, std::nullopt, std::nullopt};
  if (out_mask.has_value()) {
    c.out_index = kept(out_mask, g.c_out, x);
    c.weight = c.weight.index_select(0, *c.out_index);
    if (bias.has_value()) c.bias = bias->index_select(0, *c.out_index);
  }
  if (in_mask.has_value()) {
    c.in_index = kept(in_mask, g.c_in, x);
    c.weight = c.weight.index_select(1, *c.in_index);
  }
  return c;
}

// y (N, k, H, W) into channels `index` of an (N, channels, H, W) output, the others 0, with
// zeros and index_copy (devices without a fused version; no host synchronisation).
inline at::Tensor scatter_channels(const at::Tensor& y, const at::Tensor& index, int64_t channels,
                                   at::MemoryFormat format) {
  // at::empty takes the layout (at::zeros drops an options' memory format).
  at::Tensor out = at::empty({y.size(0), channels, y.size(2), y.size(3)}, y.options(), format).zero_();
  out.index_copy_(1, index, y);
  return out;
}

// _channel_conv with ATen's index_select and index_copy: what CUDA runs (cuDNN underneath).
inline at::Tensor channel_conv(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               const std::optional<at::Tensor>& in_index,
                               const std::optional<at::Tensor>& out_index, int64_t channels) {
  check_indices(x, weight, channels, in_index, out_index);
  const Geometry g = compact_geometry(x, weight, channels, stride, padding, dilation);
  const auto format = x.suggest_memory_format();
  at::Tensor y = compact_conv(x, weight, bias, g, in_index.value_or(at::Tensor()), format,
                              [](const at::Tensor& t, const at::Tensor& i, at::MemoryFormat f) {
                                return t.index_select(1, i).contiguous(f);
                              });
  return out_index.has_value() ? scatter_channels(y, *out_index, channels, format) : y;
}

// Static masks, groups == 1: the dense engine once on the smaller problem the masks leave.
inline at::Tensor static_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const Geometry& g,
                                 const std::optional<at::Tensor>& in_mask,
                                 const std::optional<at::Tensor>& out_mask) {
  const Compacted c = compact(x, weight, bias, g, in_mask, out_mask);
  return channel_conv(x, c.weight, c.bias, g.stride, g.padding, g.dilation, c.in_index,
                      c.out_index, g.c_out);
}

// (grad_x, grad_weight, grad_bias) of static_forward: the engine's backward on the same smaller
// problem, scattered into zero gradients of the full shapes.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> static_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const Geometry& g,
    const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask) {
  const auto format = x.suggest_memory_format();
  const at::Tensor out_idx = kept(out_mask, g.c_out, x);
  const at::Tensor in_idx = kept(in_mask, g.c_in, x);
  const bool work = g.n > 0 && out_idx.size(0) > 0 && in_idx.size(0) > 0;
  if (work && !in_mask.has_value() && !out_mask.has_value()) {  // the engine's own backward
    return at::convolution_backward(grad.contiguous(format), x.contiguous(format),
                                    weight.contiguous(), at::OptionalIntArrayRef(at::IntArrayRef{g.c_out}),
                                    g.stride, g.padding, g.dilation, false, {0, 0}, 1,
                                    {true, true, true});
  }
  at::Tensor grad_b = at::zeros({g.c_out}, weight.options());
  at::Tensor gy;
  if (g.n > 0 && out_idx.size(0) > 0) {
    gy = out_mask.has_value() ? grad.index_select(1, out_idx) : grad;
    grad_b.index_copy_(0, out_idx, gy.sum({0, 2, 3}).to(weight.scalar_type()));
  }
  if (!work) {
    return {at::zeros_like(x, format), at::zeros_like(weight, at::MemoryFormat::Contiguous), grad_b};
  }
  const at::Tensor xs = in_mask.has_value() ? x.index_select(1, in_idx) : x;
  at::Tensor w = out_mask.has_value() ? weight.index_select(0, out_idx) : weight;
  if (in_mask.has_value()) w = w.index_select(1, in_idx);
  auto [gx, gw, unused] = at::convolution_backward(
      gy.contiguous(format), xs.contiguous(format), w.contiguous(), std::nullopt, g.stride,
      g.padding, g.dilation, false, {0, 0}, 1, {true, true, false});
  at::Tensor grad_x = gx;
  if (in_mask.has_value()) {
    grad_x = at::zeros_like(x, format);
    grad_x.index_copy_(1, in_idx, gx);
  }
  at::Tensor grad_w = gw;
  if (in_mask.has_value() || out_mask.has_value()) {
    grad_w = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    grad_w.index_put_({out_idx.view({-1, 1}), in_idx.view({1, -1})}, gw);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace masked_conv
}  // namespace pyprune
