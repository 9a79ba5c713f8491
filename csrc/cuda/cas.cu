// CAS on CUDA. Forward: one launch, one block per sample, in three phases:
//   1. the channel means (stored to `mean`); in training (label given) the same pass writes
//      out = x * weight[label];
//   2. logits = mean @ weight.T + bias, a warp per class, stored in x's dtype; in inference the
//      block's argmax over the stored (rounded) logits, first index on ties, NaN largest;
//   3. inference only: out = x * weight[argmax], rereading the sample the block just read (from
//      L1/L2: a ResNet sample of 512x4x4 or 256x8x8 is 32-64 KiB in float32).
// Backward: one launch, one block per sample: grad_x = grad_out * weight[index] + a and the
// channel sums of grad_out * x from one pass over both; a = (grad_logits @ weight) / L and
// grad_weight = grad_logits.T @ mean + sums scatter-added into the index rows are small GEMMs
// around it.
//
// Layouts: with channels contiguous (channels_last) a thread owns a channel and walks the
// spatial positions (adjacent threads read adjacent channels); otherwise a warp owns a channel
// and its lanes walk the spatial positions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../cas.h"

namespace pyprune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename scalar_t>
struct ForwardParams {
  using acc_t = typename CasAcc<scalar_t>::type;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ w;
  const scalar_t* __restrict__ b;  // nullptr: no bias
  const int64_t* __restrict__ label;  // nullptr: inference
  scalar_t* __restrict__ out;
  scalar_t* __restrict__ logits;
  int64_t* __restrict__ index;
  acc_t* __restrict__ mean;
  int64_t K, L, C;
  int64_t xs0, xs1, xs2, os0, os1, os2, ws0, ws1;
  bool channels_inner;
};

// One sweep over a sample: with kSum the channel means go to mean[k]; with kWrite out = x * m.
template <bool kSum, bool kWrite, typename scalar_t, typename acc_t>
__device__ void sweep(const ForwardParams<scalar_t>& p, const scalar_t* xn, scalar_t* on,
                      const scalar_t* m_row, acc_t* mean) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const acc_t inv_l = acc_t(1) / acc_t(p.L);
  if (p.channels_inner) {
    for (int64_t k = tid; k < p.K; k += kThreads) {
      const acc_t mk = kWrite ? static_cast<acc_t>(m_row[k * p.ws1]) : acc_t(0);
      acc_t s = 0;
      for (int64_t l = 0; l < p.L; ++l) {
        const acc_t v = static_cast<acc_t>(xn[k + l * p.xs2]);
        if (kSum) s += v;
        if (kWrite) on[k + l * p.os2] = static_cast<scalar_t>(v * mk);
      }
      if (kSum) mean[k] = s * inv_l;
    }
    return;
  }
  for (int64_t k = warp; k < p.K; k += kWarps) {
    const acc_t mk = kWrite ? static_cast<acc_t>(m_row[k * p.ws1]) : acc_t(0);
    const scalar_t* xr = xn + k * p.xs1;
    scalar_t* orow = on + k * p.os1;
    acc_t s = 0;
    for (int64_t l = lane; l < p.L; l += 32) {
      const acc_t v = static_cast<acc_t>(xr[l * p.xs2]);
      if (kSum) s += v;
      if (kWrite) orow[l * p.os2] = static_cast<scalar_t>(v * mk);
    }
    if (kSum) {
      s = warp_sum(s);
      if (lane == 0) mean[k] = s * inv_l;
    }
  }
}

template <typename scalar_t, bool kTrain>
__global__ void __launch_bounds__(kThreads) cas_forward_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = typename CasAcc<scalar_t>::type;
  __shared__ acc_t warp_best_v[kWarps];
  __shared__ int64_t warp_best_i[kWarps];
  __shared__ int64_t chosen;
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const scalar_t* xn = p.x + n * p.xs0;
  scalar_t* on = p.out + n * p.os0;
  acc_t* mean = p.mean + n * p.K;

  int64_t label = 0;
  if constexpr (kTrain) {
    label = p.label[n];
    CUDA_KERNEL_ASSERT(label >= 0 && label < p.C);
  }
  sweep<true, kTrain>(p, xn, on, p.w + label * p.ws0, mean);
  __syncthreads();  // the means are in global memory, written by this block

  acc_t best_v = 0;
  int64_t best_i = -1;
  for (int64_t c = warp; c < p.C; c += kWarps) {
    const scalar_t* wr = p.w + c * p.ws0;
    acc_t d = 0;
    for (int64_t k = lane; k < p.K; k += 32) d += static_cast<acc_t>(wr[k * p.ws1]) * mean[k];
    d = warp_sum(d);
    if (p.b != nullptr) d += static_cast<acc_t>(p.b[c]);
    const scalar_t r = static_cast<scalar_t>(d);
    if (lane == 0) p.logits[n * p.C + c] = r;
    const acc_t v = static_cast<acc_t>(r);
    if (best_i < 0 || argmax_better(v, c, best_v, best_i)) best_v = v, best_i = c;
  }
  if constexpr (kTrain) {
    if (tid == 0) p.index[n] = label;
    return;
  } else {
    if (lane == 0) {
      warp_best_v[warp] = best_v;
      warp_best_i[warp] = best_i;
    }
    __syncthreads();
    if (tid == 0) {
      acc_t v = warp_best_v[0];
      int64_t i = warp_best_i[0];
      for (int w = 1; w < kWarps; ++w) {
        if (warp_best_i[w] >= 0 && argmax_better(warp_best_v[w], warp_best_i[w], v, i)) {
          v = warp_best_v[w];
          i = warp_best_i[w];
        }
      }
      chosen = i;
      p.index[n] = i;
    }
    __syncthreads();
    sweep<false, true>(p, xn, on, p.w + chosen * p.ws0, mean);
  }
}

template <typename scalar_t>
struct BackwardParams {
  using acc_t = typename CasAcc<scalar_t>::type;
  const scalar_t* __restrict__ g;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ w;
  const int64_t* __restrict__ index;
  const acc_t* __restrict__ a;  // (N, K) contiguous
  scalar_t* __restrict__ gx;
  acc_t* __restrict__ t;  // (N, K) contiguous
  int64_t K, L, C;
  int64_t gs0, gs1, gs2, xs0, xs1, xs2, os0, os1, os2, ws0, ws1;
  bool channels_inner;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cas_backward_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = typename CasAcc<scalar_t>::type;
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t idx = p.index[n];
  CUDA_KERNEL_ASSERT(idx >= 0 && idx < p.C);
  const scalar_t* m_row = p.w + idx * p.ws0;
  const scalar_t* gn = p.g + n * p.gs0;
  const scalar_t* xn = p.x + n * p.xs0;
  scalar_t* on = p.gx + n * p.os0;
  const acc_t* an = p.a + n * p.K;
  acc_t* tn = p.t + n * p.K;
  if (p.channels_inner) {
    for (int64_t k = tid; k < p.K; k += kThreads) {
      const acc_t mk = static_cast<acc_t>(m_row[k * p.ws1]), ak = an[k];
      acc_t s = 0;
      for (int64_t l = 0; l < p.L; ++l) {
        const acc_t gv = static_cast<acc_t>(gn[k + l * p.gs2]);
        s += gv * static_cast<acc_t>(xn[k + l * p.xs2]);
        on[k + l * p.os2] = static_cast<scalar_t>(gv * mk + ak);
      }
      tn[k] = s;
    }
    return;
  }
  for (int64_t k = warp; k < p.K; k += kWarps) {
    const acc_t mk = static_cast<acc_t>(m_row[k * p.ws1]), ak = an[k];
    const scalar_t* gr = gn + k * p.gs1;
    const scalar_t* xr = xn + k * p.xs1;
    scalar_t* orow = on + k * p.os1;
    acc_t s = 0;
    for (int64_t l = lane; l < p.L; l += 32) {
      const acc_t gv = static_cast<acc_t>(gr[l * p.gs2]);
      s += gv * static_cast<acc_t>(xr[l * p.xs2]);
      orow[l * p.os2] = static_cast<scalar_t>(gv * mk + ak);
    }
    s = warp_sum(s);
    if (lane == 0) tn[k] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cas_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& label) {
  check_cas_args(x, weight, bias, label);
  TORCH_CHECK(x.is_cuda(), "cas (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), C = weight.size(0);
  at::Tensor out = at::empty_like(x);
  at::Tensor logits = at::empty({N, C}, x.options());
  at::Tensor index = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({N, K}, x.options().dtype(cas_acc_dtype(x.scalar_type())));
  if (N == 0) return {out, logits, index, mean};
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "cas (cuda): at most 2^31 - 1 samples");
  // The kernel reads label[n] and bias[c] at unit stride.
  const at::Tensor labels = label ? label->contiguous() : at::Tensor();
  const at::Tensor biases = bias ? bias->contiguous() : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_cuda", [&] {
    ForwardParams<scalar_t> p{};
    p.x = x.const_data_ptr<scalar_t>();
    p.w = weight.const_data_ptr<scalar_t>();
    p.b = bias ? biases.const_data_ptr<scalar_t>() : nullptr;
    p.label = label ? labels.const_data_ptr<int64_t>() : nullptr;
    p.out = out.mutable_data_ptr<scalar_t>();
    p.logits = logits.mutable_data_ptr<scalar_t>();
    p.index = index.mutable_data_ptr<int64_t>();
    p.mean = mean.mutable_data_ptr<typename CasAcc<scalar_t>::type>();
    p.K = K, p.L = x.size(2), p.C = C;
    p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
    p.os0 = out.stride(0), p.os1 = out.stride(1), p.os2 = out.stride(2);
    p.ws0 = weight.stride(0), p.ws1 = weight.stride(1);
    p.channels_inner = x.stride(1) == 1 && out.stride(1) == 1 && x.size(2) > 1;
    const unsigned blocks = static_cast<unsigned>(N);
    if (label) {
      cas_forward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      cas_forward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, logits, index, mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cas_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_logits, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& index, const at::Tensor& mean) {
  check_cas_backward_args(grad_out, grad_logits, x, weight, index, mean);
  TORCH_CHECK(x.is_cuda(), "cas backward (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), L = x.size(2);
  const at::ScalarType acc = cas_acc_dtype(x.scalar_type());
  const at::Tensor idx = index.contiguous();
  const at::Tensor gl = grad_logits.to(acc);
  // The logits' gradient reaches every element of a channel as (grad_logits @ weight) / L.
  const at::Tensor a = at::mm(gl, weight.to(acc)).div_(L).contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor t = at::empty({N, K}, a.options());
  if (N > 0) {
    TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "cas (cuda): at most 2^31 - 1 samples");
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cas_backward_cuda", [&] {
      using acc_t = typename CasAcc<scalar_t>::type;
      BackwardParams<scalar_t> p{};
      p.g = grad_out.const_data_ptr<scalar_t>();
      p.x = x.const_data_ptr<scalar_t>();
      p.w = weight.const_data_ptr<scalar_t>();
      p.index = idx.const_data_ptr<int64_t>();
      p.a = a.const_data_ptr<acc_t>();
      p.gx = gx.mutable_data_ptr<scalar_t>();
      p.t = t.mutable_data_ptr<acc_t>();
      p.K = K, p.L = L, p.C = weight.size(0);
      p.gs0 = grad_out.stride(0), p.gs1 = grad_out.stride(1), p.gs2 = grad_out.stride(2);
      p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
      p.os0 = gx.stride(0), p.os1 = gx.stride(1), p.os2 = gx.stride(2);
      p.ws0 = weight.stride(0), p.ws1 = weight.stride(1);
      p.channels_inner = grad_out.stride(1) == 1 && x.stride(1) == 1 && gx.stride(1) == 1 && L > 1;
      cas_backward_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // grad_weight = grad_logits.T @ mean (the logits path) + the sums scatter-added into the
  // chosen rows (atomic on CUDA: not bitwise deterministic).
  at::Tensor gw = at::mm(gl.t(), mean);
  gw.index_add_(0, idx, t);
  return {gx, gw.to(weight.scalar_type()), gl.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("cas", &cas_cuda);
  m.impl("_cas_backward", &cas_backward_cuda);
}

}  // namespace pyprune
