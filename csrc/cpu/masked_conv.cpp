// Masked convolution on the CPU (contract: csrc/ops.cpp, csrc/masked_conv.h).
//
// Static masks ((C,) or none): oneDNN runs once on the smaller problem the masks leave
// (masked_conv::static_forward). Per-sample masks ((N, C), dynamic channel gating): the batch is
// split over threads and each sample runs its own smaller problem: the sample's kept input
// channels against the weight's kept rows and columns, written into its kept output channels
// while the masked ones are zero-filled. The engine runs single-threaded inside the parallel
// region, so the threads never share a problem. Backward does the same per sample; each thread
// adds its samples' weight and bias gradients into a buffer of its own, summed at the end.
// groups > 1 runs the dense engine with the masks applied around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../masked_conv.h"

namespace pyprune {
namespace {

using masked_conv::Geometry;

// Kept and dropped channel indices of sample n (row n of a 2-D mask, the 1-D mask, or all).
struct Channels {
  at::Tensor kept, dropped;
  bool all() const { return dropped.size(0) == 0; }
};

Channels channels_of(const std::optional<at::Tensor>& mask, int64_t n, int64_t c) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  if (!mask.has_value()) return {at::arange(c, opts), at::empty({0}, opts)};
  const at::Tensor row = mask->dim() == 2 ? mask->select(0, n) : *mask;
  const bool* m = row.data_ptr<bool>();
  const int64_t step = row.stride(0);
  int64_t k = 0;
  for (int64_t i = 0; i < c; ++i) k += m[i * step];
  at::Tensor kept = at::empty({k}, opts), dropped = at::empty({c - k}, opts);
  int64_t* kp = kept.data_ptr<int64_t>();
  int64_t* dp = dropped.data_ptr<int64_t>();
  for (int64_t i = 0; i < c; ++i) *(m[i * step] ? kp++ : dp++) = i;
  return {kept, dropped};
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
    xs = xs.index_select(1, in.kept);
    w = w.index_select(1, in.kept);
  }
  return {xs, w.contiguous()};
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
  if (groups > 1) return masked_conv::dense_forward(x, weight, bias, g, in_mask, out_mask);
  if (!masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask))
    return masked_conv::static_forward(x, weight, bias, g, in_mask, out_mask);

  const auto format = x.suggest_memory_format();
  at::Tensor out = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options(), format);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Channels in = channels_of(in_mask, n, g.c_in);
      const Channels oc = channels_of(out_mask, n, g.c_out);
      at::Tensor o = out.select(0, n);
      if (!oc.all()) o.index_fill_(0, oc.dropped, 0);
      const int64_t k_out = oc.kept.size(0);
      if (k_out == 0) continue;
      std::optional<at::Tensor> b;
      if (bias.has_value()) b = oc.all() ? *bias : bias->index_select(0, oc.kept);
      at::Tensor y;
      if (in.kept.size(0) == 0) {
        y = b.has_value() ? b->view({-1, 1, 1}).expand({k_out, g.h_out, g.w_out})
                          : at::zeros({k_out, g.h_out, g.w_out}, x.options());
      } else {
        const Problem p = problem_of(x, weight, n, in, oc);
        y = at::convolution(p.x, p.weight, b, g.stride, g.padding, g.dilation, false, {0, 0}, 1)
                .select(0, 0);
      }
      if (oc.all()) o.copy_(y);
      else o.index_copy_(0, oc.kept, y);
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
  if (groups > 1) return masked_conv::dense_backward(grad, x, weight, g, in_mask, out_mask);
  if (!masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask))
    return masked_conv::static_backward(grad, x, weight, g, in_mask, out_mask);

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
      at::Tensor gx = grad_x.select(0, n);
      if (!in.all()) gx.index_fill_(0, in.dropped, 0);
      if (oc.kept.size(0) == 0) {
        if (in.kept.size(0) > 0) gx.index_fill_(0, in.kept, 0);
        continue;
      }
      at::Tensor gy = grad.narrow(0, n, 1);
      if (!oc.all()) gy = gy.index_select(1, oc.kept);
      grad_b[t].index_add_(0, oc.kept, gy.sum({0, 2, 3}).to(acc.dtype()));
      if (in.kept.size(0) == 0) continue;
      const Problem p = problem_of(x, weight, n, in, oc);
      auto [gxs, gws, unused] = at::convolution_backward(
          gy.contiguous(p.x.suggest_memory_format()), p.x, p.weight, std::nullopt, g.stride,
          g.padding, g.dilation, false, {0, 0}, 1, {true, true, false});
      if (in.all()) gx.copy_(gxs.select(0, 0));
      else gx.index_copy_(0, in.kept, gxs.select(0, 0));
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
}

}  // namespace pyprune
