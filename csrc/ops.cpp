// Every pyprune operator schema, and the Python module stub whose import runs the registrations.
// Backend files register only their own dispatch key (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

extern "C" {
// `import pyprune._C` loads this library, which runs the TORCH_LIBRARY blocks; no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyprune, m) {
  // x: (N, C, L) view, any strides; each (n, c) row of L elements is one group.
  // Returns out (x's layout; x where key >= the group's k-th largest key or NaN, else 0) and the
  // per-group threshold (N, C) in x's dtype, which is all backward needs.
  m.def("kwta(Tensor x, SymInt k, bool absolute) -> (Tensor, Tensor)");
  // grad_x = grad where key(x) >= threshold (or x is NaN), else 0; layout of x.
  m.def("_kwta_backward(Tensor grad, Tensor x, Tensor threshold, bool absolute) -> Tensor");
  // SAP (csrc/sap.h): x (N, L) view, one sample per row; seed: int64 (2,) = (key, stream) of the
  // Philox stream (csrc/random.h), read on x's device; r >= 1 draws per sample. out = x / q where
  // kept (exact: drawn among r draws with replacement from |x| / sum|x|; else u < q), 0 elsewhere.
  m.def("sap(Tensor x, Tensor seed, SymInt r, bool exact) -> Tensor");
  // grad * kept / q, the kept set regenerated from the seed (nothing input-sized is saved).
  m.def("_sap_backward(Tensor grad, Tensor x, Tensor seed, SymInt r, bool exact) -> Tensor");
  // x (1-D view) + std * n, or x * (1 + std * n) if multiplicative; n ~ N(0, 1) from the seed's
  // stream, value i from element i. Backward of the multiplicative form is this op on grad.
  m.def("gaussian_noise(Tensor x, Tensor seed, float std, bool multiplicative) -> Tensor");
  // CAS. x: (N, K, L) view of (N, K, H, W) (L = H * W, any strides); weight (C, K); bias (C,) or
  // None; label (N,) int64 or None (then the argmax of the logits, first index on ties).
  // Returns out (x's layout; x * weight[index] per channel), logits (N, C) in x's dtype, index
  // (N,) int64 (the label or the argmax) and the channel means (N, K) in float32 (float64 for
  // float64 x): what backward needs besides x and weight.
  m.def("cas(Tensor x, Tensor weight, Tensor? bias, Tensor? label) -> (Tensor, Tensor, Tensor, Tensor)");
  // One pass over x and grad_out: grad_x = grad_out * weight[index] + (grad_logits @ weight) / L,
  // and the channel sums of grad_out * x, scatter-added into the index rows of grad_weight =
  // grad_logits.T @ mean + ...; grad_bias = grad_logits.sum(0). Returns (grad_x, grad_weight,
  // grad_bias), grad_weight and grad_bias in weight's dtype.
  m.def("_cas_backward(Tensor grad_out, Tensor grad_logits, Tensor x, Tensor weight, Tensor index, Tensor mean) -> (Tensor, Tensor, Tensor)");
  // Masked convolution (csrc/masked_conv.h): conv2d(x * in_mask, weight, bias) * out_mask with
  // boolean channel masks, in_mask (C_in,) or (N, C_in), out_mask (C_out,) or (N, C_out), None =
  // all kept. Masked work is skipped; masked output channels are exactly 0. Output (N, C_out,
  // H_out, W_out) in x's memory format.
  m.def("masked_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? in_mask, Tensor? out_mask) -> Tensor");
  // (grad_x, grad_weight, grad_bias) of masked_conv2d; grad_bias (C_out,) is returned always.
  m.def("_masked_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? in_mask, Tensor? out_mask) -> (Tensor, Tensor, Tensor)");
  // masked_conv2d (groups 1) whose channel masks may also be soft: in_mask and out_mask each
  // bool (structural, as above) or float in x's dtype (scales applied inside the kernel: x's
  // channels as they are loaded, the output in the epilogue), (C,) or (N, C). Returns (out, the
  // unscaled output conv2d(x * in_mask, weight, bias) if raw else an empty tensor), raw for a
  // soft out_mask's gradient. CUDA (the Triton backend's is pyprune::_masked_conv2d_scaled_triton).
  m.def("_masked_conv2d_scaled(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, Tensor? in_mask, Tensor? out_mask, bool raw) -> (Tensor, Tensor)");
  // The static-mask convolution on operands compacted beforehand (MaskedConv2d caches them):
  // conv2d(x[:, in_index], weight, bias) written into channels out_index of an (N, channels,
  // H_out, W_out) output in x's memory format, the other channels 0. weight (k_out, k_in, kh,
  // kw) and bias (k_out,) hold the kept rows; an index None means all channels. groups 1.
  m.def("_channel_conv(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, Tensor? in_index, Tensor? out_index, int channels) -> Tensor");

  // conv2d(x, weight * weight_mask, bias, stride, padding, dilation) with a bool weight_mask of
  // weight's shape, groups 1 (CPU): a direct sparse convolution over the kept weights where they
  // are few enough to pay (csrc/cpu/sparse_conv.cpp), else the dense engine on the masked weight.
  // Masked weights take no part. Output in x's memory format.
  m.def("_sparse_conv2d(Tensor x, Tensor weight, Tensor weight_mask, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // (grad_x, grad_weight) of _sparse_conv2d, each computed only if its flag is set (else an empty
  // tensor); grad_weight is 0 at masked weights, grad_x in x's memory format.
  m.def("_sparse_conv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor weight_mask, int[2] stride, int[2] padding, int[2] dilation, bool x_grad, bool weight_grad) -> (Tensor, Tensor)");

  // The instruction set the CPU kernels run with now: "avx2" or "baseline" (csrc/cpu/isa.h).
  m.def("_cpu_isa() -> str", []() -> std::string { return pyprune::use_avx2() ? "avx2" : "baseline"; });
}
