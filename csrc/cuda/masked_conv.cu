// Masked 2-D convolution on CUDA (csrc/masked_conv.h has the semantics and the shared pieces).
//
// Forward dispatch:
//   groups > 1                         masked_conv::dense_forward: cuDNN on the full problem,
//                                      the masks applied around it (nothing skipped);
//   no per-sample mask                 cuDNN on the smaller problem left by the (C,) masks
//                                      (kept-channel indices cached per mask version; a mask not
//                                      seen before during CUDA graph capture takes the kernels
//                                      below instead); with an out_mask, static_forward_cuda
//                                      (kept weight rows, cuDNN, one fused scatter + bias pass),
//                                      else masked_conv::static_forward; but where the packed
//                                      tensor-core kernel below has little serial work
//                                      (static_on_tensor_cores: few K steps and CTAs for a round
//                                      or two of the GPU), pack_kernel (a bool in_mask's kept
//                                      channels listed first) and that kernel, the (C,) out_mask
//                                      read on the device;
//   an (N, C) mask, groups == 1        the implicit-GEMM kernels below, one launch for the batch:
//                                      on tensor cores for bf16, fp16 and float32 where
//                                      torch.backends.cudnn.allow_tf32 (TF32) either
//                                      masked_conv2d_tc_packed_kernel after pack_kernel (no
//                                      per-sample bool in_mask: x and the weight laid out
//                                      channels-innermost, 16-byte cp.async copies; tiles of
//                                      whole output rows reading x from a patch in shared
//                                      memory, across samples for static masks, K split over
//                                      a cluster where the tiles leave SMs idle) or
//                                      masked_conv2d_tc_kernel (a per-sample bool in_mask: each
//                                      sample's kept channels gathered); else masked_conv2d_kernel
//                                      (FMA: full float32, float64).
// Backward: static masks with groups == 1 run masked_conv::static_backward (as the forward
// for masks not seen before during capture).
// Per-sample masks with stride 1 (groups 1, not float64) take grad_x from the per-sample kernel
// run on grad with the transposed, flipped weight and the masks swapped, so it skips the masked
// output channels and writes the masked input channels as zeros; the weight and bias gradients
// run densely on the masked tensors. Everything else runs masked_conv::dense_backward, the dense
// engine's backward with the masks applied around it.
//
// The FMA kernel (the tensor-core kernel below shares its structure). For sample n, out[n]
// (C_out x P, P = H_out * W_out) = W' @ X'[n], where W' holds the rows of weight for the kept
// output channels of n and X'[n] is the im2col matrix of x[n] restricted to the rows (c, kh, kw)
// of its kept input channels c. Neither matrix exists in memory: the tiles are gathered from
// weight and x on the fly (implicit GEMM), padding reading as 0. Grid (pixel tile, output-channel tile, sample); 256 threads compute a 64 x 64 tile of
// out[n], each thread a 4 x 4 micro-tile in registers, accumulated in float (double for double).
//
// Output channels: tile t of sample n computes the kept output channels of n with rank
// [64t, 64t + 64) (found by a block-wide ballot scan of out_mask[n]), so the work of a sample is
// packed into its first ceil(kept / 64) tiles whatever the pattern of its mask (gating masks
// rarely leave a whole 64-channel range empty), and the tiles past those load nothing and do no
// arithmetic. Independently, tile t writes the exact zeros (no bias) of the masked channels whose
// ids lie in [64t, 64t + 64), so every output element is written exactly once; kept channels get
// the bias.
//
// Reduction: the input channels are taken in chunks of 256. For each chunk the block compacts
// the kept input channels of sample n into shared memory (ballot scan) and the K loop runs over
// (kept channel, kh, kw) only, in steps of 16: a 16 x 64 slice of W' and a 16 x 64 slice of X'
// are staged in shared memory, double-buffered (the global loads of step s + 1 are in flight
// while step s is computed; one barrier per step). Each thread walks its k positions with
// mixed-radix counters, so the loop has no integer division. Masked input channels are never
// read (inf or NaN in them cannot leak). The partial last step of a chunk is padded with zeros.
//
// Soft (float) masks (pyprune::_masked_conv2d_scaled): a soft in_mask scales each staged x value
// of its channel (rounded to x's dtype, as x * in_mask is), a soft out_mask the output in the
// epilogue (the rounded convolution times the scale), and raw, when asked for, receives the
// unscaled output as well; all channels of a soft mask count as kept.
//
// x, weight and the output are used as contiguous NCHW (a channels_last x is copied once; the
// result is converted back to x's memory format). Masks are read on the device through their
// strides (a (C,) mask next to an (N, C) one has sample stride 0): no host synchronisation, so the
// per-sample path is CUDA-graph safe.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../masked_conv.h"
#include "cluster.cuh"

namespace pyprune {
namespace {

namespace wmma = nvcuda::wmma;
namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileM = 64;   // output channels per tile
constexpr int kTileP = 64;   // output pixels per tile
constexpr int kTileK = 16;   // (input channel, kh, kw) positions per K step
constexpr int kChunk = kThreads;  // input channels compacted at a time, one per thread
constexpr int kPadA = 4;     // keeps rows 16-byte aligned for the 4-wide shared reads
constexpr int kPadB = 16;    // the two k rows a warp stores land in different banks
constexpr int kMicro = 4;    // micro-tile side: (kTileM / kMicro) * (kTileP / kMicro) == kThreads
constexpr int kLoads = kTileM * kTileK / kThreads;  // weight (and patch) values a thread stages
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kIntMax = std::numeric_limits<int>::max();
static_assert((kTileM / kMicro) * (kTileP / kMicro) == kThreads, "one micro-tile per thread");
static_assert(kTileK * kTileP == kTileM * kTileK && kLoads == 4, "thread-to-load mapping");

template <typename scalar_t>
struct Params {
  const scalar_t* __restrict__ x;     // (N, C_in, H, W) contiguous
  const scalar_t* __restrict__ weight;  // (C_out, C_in, KH, KW) contiguous
  const scalar_t* __restrict__ bias;    // (C_out,) or nullptr
  scalar_t* __restrict__ out;         // (N, C_out, H_out, W_out) contiguous
  const bool* __restrict__ in_mask;   // nullptr: all kept; else [n * in_s0 + c * in_s1]
  const bool* __restrict__ out_mask;  // nullptr: all kept; else [n * out_s0 + c * out_s1]
  // Soft masks (at most one of in_mask / in_scale, of out_mask / out_scale; the same strides):
  // x's channels times in_scale as they are staged, the output times out_scale; raw, if set,
  // receives the unscaled output (same layout as out).
  const scalar_t* __restrict__ in_scale;
  const scalar_t* __restrict__ out_scale;
  scalar_t* __restrict__ raw;
  int64_t in_s0, in_s1, out_s0, out_s1;
  int64_t n;
  int c_in, h, w, c_out, kh, kw, w_out, pixels, khw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // kTileK written in the mixed radix of the (c, kh, kw) counters: kTileK = step_c * khw +
  // step_r and step_r = step_kh * kw + step_kw.
  int step_c, step_r, step_kh, step_kw;
};

// Rank of this thread's flag among the set flags of the block (threads in order); total = number
// of set flags. Block-wide: every thread must call it. warp_count: kWarps ints of shared memory.
__device__ inline int block_rank(bool flag, int* warp_count, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_count[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    const int c = warp_count[i];
    before += i < warp ? c : 0;
    total += c;
  }
  __syncthreads();  // warp_count is free again for the next call
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// One sample's masks, scales and tensors, as both kernels address them.
template <typename scalar_t>
struct SampleView {
  const bool* om;        // output mask row, nullptr: all kept
  const bool* im;        // input mask row, nullptr: all kept
  const scalar_t* is;    // soft input mask row, nullptr: none
  const scalar_t* os;    // soft output mask row, nullptr: none
  scalar_t* out_n;       // the sample's (C_out, pixels) output
  scalar_t* raw_n;       // its unscaled output, nullptr: not wanted
  const scalar_t* x_n;   // its (C_in, H, W) input
  __device__ SampleView(const Params<scalar_t>& p, int64_t n) {
    const int64_t out_size = n * p.c_out * static_cast<int64_t>(p.pixels);
    om = p.out_mask != nullptr ? p.out_mask + n * p.out_s0 : nullptr;
    im = p.in_mask != nullptr ? p.in_mask + n * p.in_s0 : nullptr;
    is = p.in_scale != nullptr ? p.in_scale + n * p.in_s0 : nullptr;
    os = p.out_scale != nullptr ? p.out_scale + n * p.out_s0 : nullptr;
    out_n = p.out + out_size;
    raw_n = p.raw != nullptr ? p.raw + out_size : nullptr;
    x_n = p.x + n * p.c_in * static_cast<int64_t>(p.h) * p.w;
  }
};

// The output offset of pixel pix of v's sample for tile_output_channels and tc_epilogue: pix
// itself inside the map, -1 past it.
template <typename scalar_t>
__device__ inline int64_t map_pixel(const Params<scalar_t>& p, int pix) {
  return pix < p.pixels ? pix : -1;
}

// The output channels of a tile of kRows rows x kPixels pixels (block-wide): without an output
// mask the ids tile_c0 .. tile_c0 + kRows - 1; with one, the zeros of the masked channels whose
// ids fall in that range are written here, and the rows are the kept channels whose ranks fall
// in it. px_off is this thread's tile pixel (tid % kPixels) as an offset from v.out_n's channel
// 0 (pixels of later samples, whose mask rows are v's, lie a whole sample further each), -1
// where the tile has no such pixel. Lists the rows in out_ch and returns how many hold a kept
// channel (block-uniform); out_ch is visible after the caller's next barrier.
template <int kPixels, int kRows, typename scalar_t>
__device__ inline int tile_output_channels(const Params<scalar_t>& p, const SampleView<scalar_t>& v,
                                           int tile_c0, int64_t px_off, int* out_ch,
                                           int* warp_count) {
  const int tid = threadIdx.x;
  if (v.om == nullptr) {
    const int rows = min(kRows, p.c_out - tile_c0);
    if (tid < rows) out_ch[tid] = tile_c0 + tid;
    return rows;
  }
  if (px_off >= 0) {
    for (int m = tid / kPixels; m < kRows; m += kThreads / kPixels) {
      const int c = tile_c0 + m;
      if (c < p.c_out && !v.om[c * p.out_s1]) {
        v.out_n[static_cast<int64_t>(c) * p.pixels + px_off] = scalar_t(0);
      }
    }
  }
  int seen = 0;
  for (int c0 = 0; c0 < p.c_out && seen < tile_c0 + kRows; c0 += kThreads) {
    const int c = c0 + tid;
    const bool keep = c < p.c_out && v.om[c * p.out_s1];
    int total;
    const int rank = seen + block_rank(keep, warp_count, total);
    if (keep && rank >= tile_c0 && rank < tile_c0 + kRows) out_ch[rank - tile_c0] = c;
    seen += total;
  }
  return max(0, min(kRows, seen - tile_c0));
}

// The kept input channels of the chunk ci0 .. ci0 + kChunk - 1, in order, into in_ch (block-wide;
// visible after the caller's next barrier). Returns their count.
template <typename scalar_t>
__device__ inline int chunk_input_channels(const Params<scalar_t>& p, const bool* im, int ci0,
                                           int* in_ch, int* warp_count) {
  const int tid = threadIdx.x;
  int kept;
  if (im == nullptr) {
    kept = min(kChunk, p.c_in - ci0);
    if (tid < kept) in_ch[tid] = ci0 + tid;
  } else {
    const int c = ci0 + tid;
    const bool keep = c < p.c_in && im[c * p.in_s1];
    const int rank = block_rank(keep, warp_count, kept);
    if (keep) in_ch[rank] = c;
  }
  return kept;
}

// A k position (c, kh, kw) of the reduction, advanced by the step (step_c, step_kh, step_kw) in
// its mixed radix: one carry per digit at most.
struct PatchCounter {
  int c, kh, kw;
  template <typename scalar_t>
  __device__ PatchCounter(const Params<scalar_t>& p, int k)
      : c(k / p.khw), kh((k - c * p.khw) / p.kw), kw(k - c * p.khw - kh * p.kw) {}
  template <typename scalar_t>
  __device__ void advance(const Params<scalar_t>& p) {
    kw += p.step_kw;
    const int w_carry = kw >= p.kw;
    kw -= w_carry ? p.kw : 0;
    kh += p.step_kh + w_carry;
    const int h_carry = kh >= p.kh;
    kh -= h_carry ? p.kh : 0;
    c += p.step_c + h_carry;
  }
};

template <typename T>
__device__ inline void load4(const T* s, T (&r)[kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i) r[i] = s[i];
}

__device__ inline void load4(const float* s, float (&r)[kMicro]) {
  const float4 v = *reinterpret_cast<const float4*>(s);
  r[0] = v.x, r[1] = v.y, r[2] = v.z, r[3] = v.w;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) masked_conv2d_kernel(const Params<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ __align__(16) acc_t a_s[2][kTileK][kTileM + kPadA];  // W' slice, [k][row]
  __shared__ __align__(16) acc_t b_s[2][kTileK][kTileP + kPadB];  // X' slice, [k][pixel]
  __shared__ int out_ch[kTileM];  // output channel id of each row of the tile
  __shared__ int in_ch[kChunk];   // kept input channels of the current chunk, in order
  __shared__ int warp_count[kWarps];

  const int tid = threadIdx.x;
  const int tile_c0 = blockIdx.y * kTileM;  // first rank (kept channels) / id (zero fill)
  const int tile_p0 = blockIdx.x * kTileP;
  const int64_t hw = static_cast<int64_t>(p.h) * p.w;
  // Staging: weight values at k = ka of rows ma + 16 i; patch values at k = kb of pixels
  // pb + 16 j (16 threads read 16 adjacent pixels). Compute: rows 4 ty.., pixels 4 tx...
  const int ka = tid % kTileK, ma = tid / kTileK;
  const int kb = tid / (kTileP / kLoads), pb = tid % (kTileP / kLoads);
  const int ty = tid / (kTileP / kMicro), tx = tid % (kTileP / kMicro);

  // Input coordinates of this thread's staged pixels at kh = kw = 0; a pixel past the end gets
  // the row -2^30, which stays negative after adding dilation * kh < 2^29 (checked on the host),
  // so the unsigned bounds test rejects it like padding.
  int ih0[kLoads], iw0[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int pix = tile_p0 + pb + j * (kTileP / kLoads);
    const int oh = pix / p.w_out, ow = pix - oh * p.w_out;
    ih0[j] = pix < p.pixels ? oh * p.stride_h - p.pad_h : -(1 << 30);
    iw0[j] = ow * p.stride_w - p.pad_w;
  }

  for (int64_t n = blockIdx.z; n < p.n; n += gridDim.z) {
    __syncthreads();  // the previous sample's epilogue has finished reading out_ch
    const SampleView<scalar_t> v(p, n);
    const int rows =  // rows of the tile that hold a kept channel (block-uniform)
        tile_output_channels<kTileP, kTileM>(p, v, tile_c0, map_pixel(p, tile_p0 + tid % kTileP),
                                             out_ch, warp_count);
    __syncthreads();  // out_ch is visible
    if (rows == 0) continue;  // nothing kept in this tile: no loads, no arithmetic

    int64_t w_row[kLoads];  // offset of each staged row in weight, -1 past the kept rows
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int m = ma + i * (kThreads / kTileK);
      w_row[i] = m < rows ? static_cast<int64_t>(out_ch[m]) * p.c_in * p.khw : -1;
    }

    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
    }

    for (int ci0 = 0; ci0 < p.c_in; ci0 += kChunk) {
      const int kept = chunk_input_channels(p, v.im, ci0, in_ch, warp_count);
      __syncthreads();  // in_ch is visible
      const int steps = (kept * p.khw + kTileK - 1) / kTileK;
      if (steps == 0) continue;  // block-uniform; nothing read in_ch

      // Counters of the staged k positions: (a_c, a_r) for the weight, b for the patch; a_c
      // and b.c index in_ch (>= kept: zero padding of the last step).
      int a_c = ka / p.khw, a_r = ka - a_c * p.khw;
      PatchCounter b(p, kb);
      acc_t a_reg[kLoads], b_reg[kLoads];

      auto load = [&]() {
        const bool a_ok = a_c < kept;
        const int64_t a_off = a_ok ? static_cast<int64_t>(in_ch[a_c]) * p.khw + a_r : 0;
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          a_reg[i] = a_ok && w_row[i] >= 0 ? static_cast<acc_t>(p.weight[w_row[i] + a_off])
                                           : acc_t(0);
        }
        const bool b_ok = b.c < kept;
        const scalar_t* x_c = v.x_n + (b_ok ? in_ch[b.c] * hw : 0);
        const int dh = b.kh * p.dil_h, dw = b.kw * p.dil_w;
        // A soft input mask: x * s rounded to x's dtype, as the eager product is.
        const acc_t s_b = v.is != nullptr && b_ok ? static_cast<acc_t>(v.is[in_ch[b.c] * p.in_s1])
                                                  : acc_t(1);
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          const int ih = ih0[j] + dh, iw = iw0[j] + dw;
          const bool inside = b_ok && static_cast<unsigned>(ih) < static_cast<unsigned>(p.h) &&
                              static_cast<unsigned>(iw) < static_cast<unsigned>(p.w);
          acc_t xv = inside ? static_cast<acc_t>(x_c[ih * p.w + iw]) : acc_t(0);
          if (v.is != nullptr) xv = static_cast<acc_t>(static_cast<scalar_t>(xv * s_b));
          b_reg[j] = xv;
        }
        // Next step: k += kTileK in each mixed radix (one carry per digit at most).
        a_r += p.step_r;
        const int a_carry = a_r >= p.khw;
        a_r -= a_carry ? p.khw : 0;
        a_c += p.step_c + a_carry;
        b.advance(p);
      };
      auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < kLoads; ++i) a_s[buf][ka][ma + i * (kThreads / kTileK)] = a_reg[i];
#pragma unroll
        for (int j = 0; j < kLoads; ++j) b_s[buf][kb][pb + j * (kTileP / kLoads)] = b_reg[j];
      };

      load();
      store(0);
      __syncthreads();
      for (int s = 0; s < steps; ++s) {
        const int buf = s & 1;
        const bool more = s + 1 < steps;
        if (more) load();
#pragma unroll
        for (int k = 0; k < kTileK; ++k) {
          acc_t a[kMicro], b[kMicro];
          load4(&a_s[buf][k][ty * kMicro], a);
          load4(&b_s[buf][k][tx * kMicro], b);
#pragma unroll
          for (int i = 0; i < kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
          }
        }
        if (more) store(buf ^ 1);
        // One barrier per step: buf ^ 1 was last read in step s - 1 (before the previous
        // barrier), and the stores to it are visible to step s + 1 after this one. After the
        // last step it also frees in_ch for the next chunk.
        __syncthreads();
      }
    }

#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int m = ty * kMicro + i;
      if (m >= rows) continue;
      const int c = out_ch[m];
      const acc_t bias = p.bias != nullptr ? static_cast<acc_t>(p.bias[c]) : acc_t(0);
      const acc_t scale = v.os != nullptr ? static_cast<acc_t>(v.os[c * p.out_s1]) : acc_t(1);
      scalar_t* row = v.out_n + static_cast<int64_t>(c) * p.pixels;
      scalar_t* raw_row =
          v.raw_n != nullptr ? v.raw_n + static_cast<int64_t>(c) * p.pixels : nullptr;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int pix = tile_p0 + tx * kMicro + j;
        if (pix >= p.pixels) continue;
        const scalar_t y = static_cast<scalar_t>(acc[i][j] + bias);
        if (raw_row != nullptr) raw_row[pix] = y;
        // A soft output mask: the rounded convolution times the scale, as eager rounds it.
        row[pix] = v.os != nullptr ? static_cast<scalar_t>(static_cast<acc_t>(y) * scale) : y;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The tensor-core kernel: the same implicit GEMM (output-channel ranks, input-channel chunks,
// zero writes, soft masks) with the products on tensor cores through nvcuda::wmma: bf16 / fp16
// m16n16k16 and, for float32 where PyTorch allows TF32 for cuDNN convolutions, TF32 m16n16k8
// (each staged float rounded to TF32 once, as it is stored to shared memory), float
// accumulators in both. Grid (pixel tile of 32, output-channel tile of 64, sample), 256 threads;
// a step takes 64 (input channel, kh, kw) positions, a quarter of the FMA kernel's steps.
// Staging: each thread gathers 2 x 8 weight values (rows ma + 8 i at k = ka and ka + 32) and 8
// patch values (k = kb, pixels pb + 4 j) into registers for step s + 1 before the mma of step s,
// and stores them after it to the other of two shared-memory stages (one barrier a step: the
// stores do not wait for the mma's reads of the same tiles). The gathers are element-wise with
// zero fill and an optional scale, so they go through registers (cp.async moves at least 4
// bytes, more than one bf16 / fp16 element). A block's time is the instructions of its steps
// (~570 lane instructions a thread a step for float32, ~410 for 16-bit types, in the sm_90
// SASS), so the gathers are kept short: each row's weight pointer and each pixel's input row,
// column and offset are looked up in shared memory (one load each, no 64-bit multiply), the
// channel's plane is a pointer in registers, and the fragments are loaded with the shared-memory
// form of wmma.load. W' is row-major [row][k] (a warp stores 32 consecutive k of one row), X'
// row-major [k][pixel]; row pitches of 72 and 40 elements keep every fragment pointer 32-byte
// aligned and the leading dimensions multiples of 16 bytes. Warp w computes the 16 x 16 block
// of rows 16 (w % 4) and pixels 16 (w / 4) and skips the mma when its rows are past the tile's
// kept rows or its pixels past the image (warp-uniform), so a tile with 32 kept rows runs half
// the tensor-core work. The accumulators go through shared memory (aliasing the staging tiles)
// to a coalesced epilogue, 32 threads per output row. Launch bounds (256, 2): at most 128
// registers, 25% occupancy.
template <typename scalar_t>
struct TensorCore;

// A wmma fragment of four 32-bit registers loaded from shared memory by the named PTX load
// (`Op`: e.g. "wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32"). wmma::load_matrix_sync takes
// a generic pointer, and for tf32 and bf16 nvcc keeps the generic form (address arithmetic and
// generic loads in SASS) even where the pointer is into shared memory; f16 gets the shared form.
#define PYPRUNE_WMMA_LOAD_SHARED(Op, frag, ptr, ld)                                            \
  do {                                                                                         \
    uint32_t* r_ = reinterpret_cast<uint32_t*>((frag).x);                                      \
    const unsigned a_ = static_cast<unsigned>(__cvta_generic_to_shared(ptr));                  \
    asm volatile(Op " {%0, %1, %2, %3}, [%4], %5;\n"                                           \
                 : "=r"(r_[0]), "=r"(r_[1]), "=r"(r_[2]), "=r"(r_[3])                          \
                 : "r"(a_), "r"(static_cast<unsigned>(ld))                                     \
                 : "memory");                                                                  \
  } while (0)

// The 16-bit types: m16n16k16 fragments of the CUDA type, values rounded once when staged.
template <typename CudaT>
struct TensorCore16 {
  using T = CudaT;
  static constexpr int kK = 16;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, CudaT, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, CudaT, wmma::row_major>;
  static_assert(sizeof(A) == 4 * sizeof(uint32_t) || std::is_same_v<CudaT, __half>,
                "a bf16 m16n16k16 fragment is four 32-bit registers");
  __device__ static T cast(float v) {
    if constexpr (std::is_same_v<CudaT, __half>) {
      return __float2half_rn(v);
    } else {
      return __float2bfloat16_rn(v);
    }
  }
  // Fragments from shared memory (ld: the row pitch in elements).
  __device__ static void load_a(A& a, const T* p, unsigned ld) {
    if constexpr (std::is_same_v<CudaT, __half>) {
      wmma::load_matrix_sync(a, p, ld);
    } else {
      PYPRUNE_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16", a, p, ld);
    }
  }
  __device__ static void load_b(B& b, const T* p, unsigned ld) {
    if constexpr (std::is_same_v<CudaT, __half>) {
      wmma::load_matrix_sync(b, p, ld);
    } else {
      PYPRUNE_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16", b, p, ld);
    }
  }
};

template <>
struct TensorCore<at::Half> : TensorCore16<__half> {};

template <>
struct TensorCore<at::BFloat16> : TensorCore16<__nv_bfloat16> {};

template <>
struct TensorCore<float> {
  using T = float;
  static constexpr int kK = 8;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  static_assert(sizeof(A) == 4 * sizeof(uint32_t) && sizeof(B) == 4 * sizeof(uint32_t),
                "a tf32 m16n16k8 fragment is four 32-bit registers");
  // Rounded to TF32 once, as staged (the fragments then hold TF32 values as they are loaded).
  __device__ static T cast(float v) { return wmma::__float_to_tf32(v); }
  __device__ static void load_a(A& a, const T* p, unsigned ld) {
    PYPRUNE_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32", a, p, ld);
  }
  __device__ static void load_b(B& b, const T* p, unsigned ld) {
    PYPRUNE_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k8.shared.tf32", b, p, ld);
  }
};

constexpr int kTcK = 64;        // k positions per step
constexpr int kTcHalf = 32;     // a thread stages weight values at k and k + kTcHalf
constexpr int kTcP = 32;        // output pixels per tile
constexpr int kTcLoads = 8;     // weight rows (patch pixels) a thread stages
constexpr int kTcLdA = kTcK + 8;    // row pitch of W' (elements)
constexpr int kTcLdB = kTcP + 8;    // row pitch of X' (elements)
constexpr int kTcLdC = kTcP + 4;    // accumulator tile pitch (floats)
constexpr int kTcMinBlocks = 2;     // 512 threads a SM: 25% occupancy, <= 128 registers
static_assert(kTcK == 2 * kTcHalf && kThreads / kTcHalf * kTcLoads == kTileM &&
                  kThreads / (kTcP / kTcLoads) == kTcK,
              "tensor-core staging map: 2 x 8 values of W' and 8 of X' a thread");
static_assert(kWarps == 8 && kTileM == 64 && kTcP == 32, "warp tiling: 4 x 2 blocks of 16 x 16");

// The tensor-core kernel's shared memory: a stage (the W' and X' tiles of one K step) and the
// two stages it holds (dynamic: float32's 56 KiB pass the 48 KiB static limit); the
// accumulator tile aliases them.
template <typename scalar_t>
constexpr size_t tc_stage_bytes() {
  return sizeof(typename TensorCore<scalar_t>::T) * (kTileM * kTcLdA + kTcK * kTcLdB);
}

template <typename scalar_t>
constexpr size_t tc_smem_bytes() {
  return std::max(2 * tc_stage_bytes<scalar_t>(), sizeof(float) * kTileM * kTcLdC);
}

// The tensor-core kernels' start of a sample's tile (block-wide): after the previous sample's
// epilogue has read out_ch and the accumulator tile, tile_output_channels, visible on return.
template <int kPixels, int kRows, typename scalar_t>
__device__ inline int tc_tile_rows(const Params<scalar_t>& p, const SampleView<scalar_t>& v,
                                   int tile_c0, int64_t px_off, int* out_ch, int* warp_count) {
  __syncthreads();
  const int rows =
      tile_output_channels<kPixels, kRows>(p, v, tile_c0, px_off, out_ch, warp_count);
  __syncthreads();
  return rows;
}

// The tensor-core kernels' epilogue (block-wide, after the barrier that publishes c_s): the tile's
// kept rows from the accumulator tile c_s [row][pixel] (pitch kPixels + 4 floats), kPixels
// threads per output row (coalesced), plus the bias; raw (when wanted) receives that, out the
// same times a soft out_mask's scale. px_off: as for tile_output_channels.
template <int kPixels, typename scalar_t>
__device__ inline void tc_epilogue(const Params<scalar_t>& p, const SampleView<scalar_t>& v,
                                   const float (*c_s)[kPixels + 4], const int* out_ch,
                                   int m_begin, int m_end, int64_t px_off) {
  using acc_t = float;
  const int tid = threadIdx.x;
  const int px = tid % kPixels;
  if (px_off < 0) return;
  for (int m = m_begin + tid / kPixels; m < m_end; m += kThreads / kPixels) {
    const int c = out_ch[m];
    const acc_t bias = p.bias != nullptr ? static_cast<acc_t>(p.bias[c]) : acc_t(0);
    const int64_t off = static_cast<int64_t>(c) * p.pixels + px_off;
    const scalar_t y = static_cast<scalar_t>(c_s[m][px] + bias);
    if (v.raw_n != nullptr) v.raw_n[off] = y;
    v.out_n[off] = v.os != nullptr
                       ? static_cast<scalar_t>(static_cast<acc_t>(y) *
                                               static_cast<acc_t>(v.os[c * p.out_s1]))
                       : y;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kTcMinBlocks)
    masked_conv2d_tc_kernel(const Params<scalar_t> p) {
  using TC = TensorCore<scalar_t>;
  using T = typename TC::T;
  using acc_t = float;
  constexpr int kK = TC::kK;
  constexpr size_t kStage = tc_stage_bytes<scalar_t>();
  // Dynamic: two stages (tc_smem_bytes), the accumulators aliasing them after the last step.
  extern __shared__ __align__(128) unsigned char tc_smem[];
  __shared__ int out_ch[kTileM];
  __shared__ int in_ch[kChunk];
  __shared__ int warp_count[kWarps];
  // Per pixel of the tile at kh = kw = 0: its input row and column and, modulo 2^32, the offset
  // row * W + column (one 16-byte shared load a staged value). Shared, not per thread: the
  // staging's registers are the budget that limits this kernel.
  __shared__ int4 pix_at[kTcP];
  // Per row of the tile: its weight row (kept channel out_ch[m]; row 0 for the rows past the
  // tile's kept ones, whose products reach only accumulator rows the epilogue never reads).
  __shared__ const scalar_t* w_rows[kTileM];
  // Stage buf's W' [row][k] and X' [k][pixel]; the accumulators [row][pixel]. (Indexed from
  // tc_smem itself, not through a returned pointer, so that the fragment loads stay shared-memory
  // loads rather than generic ones.)
  T* const tiles = reinterpret_cast<T*>(tc_smem);
  constexpr int kStageElems = static_cast<int>(kStage / sizeof(T));
  constexpr int kBOffset = kTileM * kTcLdA;  // X' after W' in a stage
  auto c_s = reinterpret_cast<float (*)[kTcLdC]>(tc_smem);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int tile_c0 = blockIdx.y * kTileM;
  const int tile_p0 = blockIdx.x * kTcP;
  const int64_t hw = static_cast<int64_t>(p.h) * p.w;
  const int64_t w_stride = static_cast<int64_t>(p.c_in) * p.khw;  // weight's row
  const unsigned w_in = static_cast<unsigned>(p.w);
  // Staging: weight values at k = ka, ka + 32 of rows ma + 8 i; patch values at k = kb of
  // pixels pb + 4 j. Compute: rows wm .. wm + 15, pixels wp .. wp + 15.
  const int ka = tid % kTcHalf, ma = tid / kTcHalf;
  const int kb = tid / (kTcP / kTcLoads), pb = tid % (kTcP / kTcLoads);
  const int wm = (warp % 4) * 16, wp = (warp / 4) * 16;

  // As the FMA kernel: a pixel past the end gets the row -2^30 (read as padding). The offset
  // wraps modulo 2^32 where padding makes it negative; at a position inside the image it is
  // ih * W + iw < 2^31 again. Visible after the barrier that starts each sample.
  if (tid < kTcP) {
    const int pix = tile_p0 + tid;
    const int oh = pix / p.w_out, ow = pix - oh * p.w_out;
    const int ih = pix < p.pixels ? oh * p.stride_h - p.pad_h : -(1 << 30);
    const int iw = ow * p.stride_w - p.pad_w;
    pix_at[tid] = make_int4(ih, iw,
                            static_cast<int>(static_cast<unsigned>(ih) * w_in +
                                             static_cast<unsigned>(iw)),
                            0);
  }

  for (int64_t n = blockIdx.z; n < p.n; n += gridDim.z) {
    const SampleView<scalar_t> v(p, n);
    const int64_t px_off = map_pixel(p, tile_p0 + tid % kTcP);
    const int rows = tc_tile_rows<kTcP, kTileM>(p, v, tile_c0, px_off, out_ch, warp_count);
    if (rows == 0) continue;
    const bool active = wm < rows && tile_p0 + wp < p.pixels;  // warp-uniform
    // Visible after the barrier that publishes the first chunk's in_ch.
    if (tid < kTileM) w_rows[tid] = p.weight + (tid < rows ? out_ch[tid] : 0) * w_stride;

    wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc;
    wmma::fill_fragment(acc, 0.0f);

    for (int ci0 = 0; ci0 < p.c_in; ci0 += kChunk) {
      const int kept = chunk_input_channels(p, v.im, ci0, in_ch, warp_count);
      __syncthreads();  // in_ch is visible
      const int steps = (kept * p.khw + kTcK - 1) / kTcK;
      if (steps == 0) continue;

      // Mixed-radix counters of the staged k positions: (a_c, a_r) per weight half (k + 32 h),
      // b for the patch.
      int a_c[2], a_r[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k_a = ka + h * kTcHalf;
        a_c[h] = k_a / p.khw, a_r[h] = k_a - a_c[h] * p.khw;
      }
      PatchCounter b(p, kb);
      acc_t a_reg[2][kTcLoads], b_reg[kTcLoads];

      auto load = [&]() {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Past the kept k positions (the last step's padding): zeros, nothing read.
          // (An offset within a weight row: < 2^31, checked on the host.)
          const bool a_ok = a_c[h] < kept;
          const int a_off = a_ok ? in_ch[a_c[h]] * p.khw + a_r[h] : 0;
#pragma unroll
          for (int i = 0; i < kTcLoads; ++i) {
            const int m = ma + i * (kThreads / kTcHalf);
            a_reg[h][i] = a_ok ? static_cast<acc_t>(__ldg(w_rows[m] + a_off)) : acc_t(0);
          }
          // Next step: k += kTcK in the mixed radix (one carry per digit at most).
          a_r[h] += p.step_r;
          const int a_carry = a_r[h] >= p.khw;
          a_r[h] -= a_carry ? p.khw : 0;
          a_c[h] += p.step_c + a_carry;
        }
        const bool b_ok = b.c < kept;
        // The channel's plane as a pointer in registers (opaque to the compiler, which would
        // otherwise rebuild each element's 64-bit address from x's base: four instructions, not
        // one).
        const scalar_t* x_c = v.x_n + (b_ok ? in_ch[b.c] * hw : 0);
        asm("mov.b64 %0, %0;" : "+l"(x_c));
        const int dh = b.kh * p.dil_h, dw = b.kw * p.dil_w;
        const unsigned d_off = static_cast<unsigned>(dh) * w_in + static_cast<unsigned>(dw);
        const acc_t s_b = v.is != nullptr && b_ok ? static_cast<acc_t>(v.is[in_ch[b.c] * p.in_s1])
                                                  : acc_t(1);
#pragma unroll
        for (int j = 0; j < kTcLoads; ++j) {
          const int4 at = pix_at[pb + j * (kTcP / kTcLoads)];
          const bool inside = b_ok &&
                              static_cast<unsigned>(at.x + dh) < static_cast<unsigned>(p.h) &&
                              static_cast<unsigned>(at.y + dw) < w_in;
          const scalar_t* src = x_c + static_cast<int>(static_cast<unsigned>(at.z) + d_off);
          acc_t xv = inside ? static_cast<acc_t>(__ldg(src)) : acc_t(0);
          if (v.is != nullptr) xv = static_cast<acc_t>(static_cast<scalar_t>(xv * s_b));
          b_reg[j] = xv;
        }
        b.advance(p);
      };
      auto store = [&](int buf) {
        T* const a_t = tiles + buf * kStageElems;
        T* const b_t = a_t + kBOffset;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int i = 0; i < kTcLoads; ++i) {
            a_t[(ma + i * (kThreads / kTcHalf)) * kTcLdA + ka + h * kTcHalf] =
                TC::cast(a_reg[h][i]);
          }
        }
#pragma unroll
        for (int j = 0; j < kTcLoads; ++j) {
          b_t[kb * kTcLdB + pb + j * (kTcP / kTcLoads)] = TC::cast(b_reg[j]);
        }
      };

      load();
      store(0);
      __syncthreads();
      for (int s = 0; s < steps; ++s) {
        const int buf = s & 1;
        const bool more = s + 1 < steps;  // block-uniform
        if (more) load();  // in flight during the mma
        if (active) {
          const T* const a_t = tiles + buf * kStageElems;
          const T* const b_t = a_t + kBOffset;
          // Four k slices at a time (a step of 16-bit types, half of TF32's): the next step's
          // staged values are live across this loop, and TF32 unrolled whole spills.
#pragma unroll 1
          for (int k0 = 0; k0 < kTcK; k0 += 4 * kK) {
#pragma unroll
            for (int k = k0; k < k0 + 4 * kK; k += kK) {
              typename TC::A a;
              typename TC::B b;
              TC::load_a(a, a_t + wm * kTcLdA + k, kTcLdA);
              TC::load_b(b, b_t + k * kTcLdB + wp, kTcLdB);
              wmma::mma_sync(acc, a, b, acc);
            }
          }
        }
        if (more) store(buf ^ 1);
        // One barrier a step: buf ^ 1 was last read in step s - 1, before the previous barrier,
        // and this one makes its stores visible to step s + 1. It also ends every read of buf
        // (free for step s + 2, the accumulators after the last step) and of in_ch (the next
        // chunk's).
        __syncthreads();
      }
    }

    // Every step ended with a barrier after its reads: the tiles are free for the accumulators.
    if (active) wmma::store_matrix_sync(&c_s[wm][wp], acc, kTcLdC, wmma::mem_row_major);
    __syncthreads();
    tc_epilogue<kTcP>(p, v, c_s, out_ch, 0, rows, px_off);
  }
}

// ---------------------------------------------------------------------------------------------
// The packed tensor-core path: per-sample launches without a bool in_mask (no mask, a soft one,
// or an out_mask alone) on bf16 / fp16 / TF32. The operands are laid out first by one launch
// of pack_kernel so that the K loop copies whole 16-byte vectors with no tests:
//   xp (N, H + 2 pad_h, W + 2 pad_w, C_pad): x with its padding as zeros, channels innermost,
//      a soft in_mask's scales applied (x * in_mask rounded to x's dtype), channels C_in ..
//      C_pad - 1 zero (C_pad: C_in rounded up to kPkC);
//   wp (C_out, KH * KW, C_pad): the weight's rows with the same channel order;
// float32 values rounded to TF32 there once (as the gathering kernel rounds them when staged).
// Then masked_conv2d_tc_packed_kernel: tiles of kept output channels by output pixels (32 x 64,
// or 64 x 32 for maps of at most 32 pixels whose tiles stay inside a sample; 8 warps of one
// 16 x 16 accumulator each), the zero writes and epilogue of masked_conv2d_tc_kernel, a K loop
// of steps of 32 channels of one tap. A step's W' tile is the rows' 32 channels of that tap in
// wp, copied global -> shared by cp.async 16 bytes at a time, kPkStages - 1 steps ahead, one
// barrier a step (no copies for W' rows past the tile's kept ones). Its X' tile (the pixels by
// the same 32 channels, stored [pixel][k], column-major for the mma) comes one of two ways:
//   per tap (kPatch false): copied like W' at each step from each pixel's tap-(0, 0) position
//      in xp plus the tap's offset (dh * Wp + dw) * C_pad (pixels past the image read the last
//      pixel's row: valid memory, never written out); steps run tap by tap, the chunks inside;
//   from a patch (kPatch true): the tile is whole output rows (those of one sample, or where
//      the samples share their output channels, consecutive rows of the batch, across sample
//      boundaries), and the steps run chunk by chunk, the taps inside. At the first step of
//      each chunk the block copies the next chunk's 32 channels of every xp row the tile's
//      pixels read (the patch: a run of whole padded rows, the rows of the tile's samples
//      between them included) into the other of two patch buffers, one chunk ahead; the
//      ldmatrix row address of each pixel is its position in the patch plus the tap's offset.
//      A tap's X' is read from shared memory, not L2: the L2 traffic of X' falls from 9 tiles a
//      chunk (3 x 3) to one patch (e.g. 8 x 16 rows of 32 channels for a 56-pixel tile of a
//      14 x 14 map, ~4x less), and tiles across samples share the weight rows they copy.
// Compared with the gathering kernel's ~570 lane instructions a 64-k step (float32), a 32-k step
// here is ~55-69 (sm_90 SASS): the copies' addresses, the tap counters, ldmatrix and mma.sync.
constexpr int kPkC = 32;                // channels a K step (C_pad is a multiple of it)
constexpr int kPkStages = 4;            // copies in flight: stages - 1 steps ahead
constexpr int kPkMinBlocks = 4;         // CTAs an SM the registers are capped for (64 a thread)
constexpr int kPatchMinBlocks = 3;      // the same for patch tiles (80 a thread)
// Patch tiles: the most dynamic shared memory a CTA may take (2 CTAs an SM at least), and the
// fewest taps (the patch of chunk j + 1 is copied at chunk j's first step into the buffer chunk
// j - 1 read; it must land kPkStages - 2 steps before chunk j + 1's first one, so a chunk needs
// at least kPkStages - 1 steps).
constexpr size_t kPatchMaxSmem = 102400;  // 100 KiB
constexpr int kPatchMinTaps = kPkStages - 1;

// Row pitch of the W' and X' tiles in bytes for elements of esize bytes: a row's 32 channels
// and 16 bytes more, so that the 8 rows of an ldmatrix 8 x 8 matrix fall in distinct banks
// (144 = 36 words, 80 = 20 words).
constexpr size_t pk_pitch(size_t esize) { return kPkC * esize + 16; }

// A stage of the pipeline for tiles of `rows` output channels: 96 rows of W' and X' (patch
// tiles: the W' rows alone).
constexpr size_t pk_stage_bytes(size_t esize, int rows, bool patch) {
  return (rows + (patch ? 0 : kTileM * kTcP / rows)) * pk_pitch(esize);
}

// The packed kernel's dynamic shared memory: the stages, then (patch tiles) two patch buffers of
// patch_bytes each; the accumulator tile aliases the stages.
constexpr size_t pk_smem_bytes(size_t esize, int rows, bool patch, size_t patch_bytes = 0) {
  return std::max(kPkStages * pk_stage_bytes(esize, rows, patch),
                  sizeof(float) * rows * (kTileM * kTcP / rows + 4)) +
         2 * patch_bytes;
}

// The packed operands' geometry, with the per-sample kernel's Params (masks, output, bias).
template <typename scalar_t>
struct PackedParams {
  Params<scalar_t> p;
  const scalar_t* __restrict__ xp;  // (N, hp, wp, c_pad)
  const scalar_t* __restrict__ wp;  // (C_out, taps, c_pad), or ranked: (kept, taps, c_pad)
  int hp, wp_w, c_pad;  // (the taps: p.khw)
  int ranked;  // wp holds the kept output channels of a static out_mask alone, in rank order
  // Patch tiles: output rows a tile (out_rows), whether tiles run across samples (span: the
  // samples' output channels are the same), the map's output rows, a patch buffer's bytes, and
  // the CTAs a tile's K is split over (split > 1: a cluster of that many consecutive CTAs along
  // x, sm_90 only, each summing its share of the chunks; their partial tiles summed over
  // distributed shared memory, in rank order).
  int out_rows, span, h_out;
  unsigned patch_bytes;
  int split;
};

__device__ inline void cp_async16(unsigned smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// Four 8 x 8 matrices of 16-bit pairs (8 rows of 16 bytes each, row addresses from lanes 8 i ..
// 8 i + 7 for matrix i): lane l receives the 32-bit word l % 4 of row l / 4 of each.
__device__ inline void ldsm_x4(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// d += a (16 x K, row-major fragment) b (K x 8, column-major fragment): K = 8 (tf32) or 16.
template <typename T>
__device__ inline void mma_16x8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, float>) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The products go through mma.sync (m16n8k8 tf32, m16n8k16 bf16 / fp16) with fragments loaded by
// ldmatrix: a warp's 16 x 16 block is two m16n8 accumulators, and a slice of 32 bytes of k (8
// TF32 or 16 16-bit values) takes one ldmatrix.x4 of W' (its four 8 x 8 quarters: a0..a3) and
// one of X' (both 8-pixel halves, both 16-byte halves of k: b0, b1 of each), then two mma.
// Tiles of kRows output channels by kPixels = 2048 / kRows pixels (64 x 32 or 32 x 64), the 8
// warps kRows / 16 down by kPixels / 16 across; a step's copies, 16 bytes each: kRows (+ kPixels
// per tap) rows of 32 channels, spread over the threads (a thread's copies of one row chunk
// column). Grid: per tap, (pixel tiles of a sample, channel tiles, samples); patch tiles,
// (row tiles of a sample, channel tiles, samples) or, across samples, (row tiles of the batch,
// channel tiles, 1).
template <typename scalar_t, int kRows, bool kPatch>
__global__ void __launch_bounds__(kThreads, kPatch ? kPatchMinBlocks : kPkMinBlocks)
    masked_conv2d_tc_packed_kernel(const PackedParams<scalar_t> q) {
  using T = typename TensorCore<scalar_t>::T;
  constexpr int kPixels = kTileM * kTcP / kRows;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements a 16-byte copy
  constexpr int kRowCopies = kPkC / kVec;                   // copies a 32-channel row
  constexpr int kRowsAtOnce = kThreads / kRowCopies;        // rows one copy of every thread fills
  // Copies a thread makes a step (at least one; the threads past the tile's rows skip it).
  constexpr int kACopies = (kRows + kRowsAtOnce - 1) / kRowsAtOnce;
  constexpr int kBCopies = kPatch ? 0 : (kPixels + kRowsAtOnce - 1) / kRowsAtOnce;
  constexpr int kSlices = kPkC / (2 * kVec);                // 32-byte k slices a step
  constexpr int kRowBlocks = kRows / 16;
  static_assert(kRows * kPixels == kTileM * kTcP && kRowBlocks * (kPixels / 16) == kWarps,
                "packed warp tiling: 8 blocks of 16 x 16");
  constexpr unsigned kStage = static_cast<unsigned>(pk_stage_bytes(sizeof(T), kRows, kPatch));
  constexpr unsigned kPitch = static_cast<unsigned>(pk_pitch(sizeof(T)));  // bytes a tile row
  constexpr unsigned kBOffset = kRows * kPitch;              // X' after W' in a stage (per tap)
  constexpr unsigned kPatch0 = kPkStages * kStage;           // the patch buffers (patch tiles)
  extern __shared__ __align__(128) unsigned char pk_smem[];
  __shared__ int out_ch[kRows];
  __shared__ int warp_count[kWarps];
  auto c_s = reinterpret_cast<float (*)[kPixels + 4]>(pk_smem);
  const unsigned smem0 = static_cast<unsigned>(__cvta_generic_to_shared(pk_smem));
  const Params<scalar_t>& p = q.p;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int tile_c0 = blockIdx.y * kRows;
  const int wm = (warp % kRowBlocks) * 16, wpx = (warp / kRowBlocks) * 16;
  // This thread's copies: W' rows ra + kRowsAtOnce i and X' pixels ra + kRowsAtOnce i (those
  // inside the tile), at column col.
  const int col = (tid % kRowCopies) * kVec;
  const int ra = tid / kRowCopies;
  unsigned a_dst = smem0 + ra * kPitch + col * sizeof(T);
  const unsigned b_dst = a_dst + kBOffset;
  // ldmatrix row addresses (stage 0, slice 0): W' rows wm + lane % 16, k half lane / 16; X'
  // pixels wpx + lane % 8 + 8 (lane / 16) (this lane's tile pixel b_px), k half (lane / 8) % 2.
  unsigned a_frag = smem0 + (wm + lane % 16) * kPitch + (lane / 16) * 16;
  const int b_px = wpx + lane % 8 + (lane / 16) * 8;
  const unsigned b_half = ((lane / 8) % 2) * 16;
  // This lane's X' row address (per tap: in stage 0; patch tiles: set for each tile).
  unsigned b_frag = smem0 + kBOffset + b_px * kPitch + b_half;
  const int64_t row_elems = static_cast<int64_t>(p.khw) * q.c_pad;
  const int chunks = q.c_pad / kPkC;
  // W' copies move on by a chunk a step (per tap: k = tap * C_pad + c, the chunks inside), or
  // (patch tiles: the taps inside) by a tap, and past a chunk's last tap back to the next
  // chunk's first.
  const int a_step = kPatch ? q.c_pad : kPkC;
  int a_wrap = kPatch ? kPkC - (p.khw - 1) * q.c_pad : kPkC;

  // Per tap: each X' copy's pixel at its tap-(0, 0) position inside a sample's xp (past the
  // image: the last pixel), and the X' pointer's moves after a tap's last chunk (to the next
  // kw, or to the next kh's kw = 0).
  int b_pixel[kPatch ? 1 : kBCopies];
  int next_kw = 0, next_kh = 0;
  // Patch tiles: a tap's move of the X' rows in the patch (in bytes: to the next kw, or to the
  // next kh's kw = 0).
  unsigned tap_w = 0, tap_h = 0;
  if constexpr (kPatch) {
    tap_w = p.dil_w * kPitch;
    tap_h = (p.dil_h * q.wp_w - (p.kw - 1) * p.dil_w) * kPitch;
  } else {
#pragma unroll
    for (int i = 0; i < kBCopies; ++i) {
      const int pix = min(static_cast<int>(blockIdx.x) * kPixels + ra + i * kRowsAtOnce,
                          p.pixels - 1);
      const int oh = pix / p.w_out, ow = pix - oh * p.w_out;
      b_pixel[i] = ((oh * p.stride_h) * q.wp_w + ow * p.stride_w) * q.c_pad + col;
    }
    next_kw = p.dil_w * q.c_pad - q.c_pad;
    next_kh = p.dil_h * q.wp_w * q.c_pad - (p.kw - 1) * p.dil_w * q.c_pad - q.c_pad;
  }
  // Kept in registers (opaque to the compiler, which would otherwise recompute them from the
  // parameters every step).
  asm("mov.b32 %0, %0;" : "+r"(next_kw));
  asm("mov.b32 %0, %0;" : "+r"(next_kh));
  asm("mov.b32 %0, %0;" : "+r"(tap_w));
  asm("mov.b32 %0, %0;" : "+r"(tap_h));
  asm("mov.b32 %0, %0;" : "+r"(b_frag));
  asm("mov.b32 %0, %0;" : "+r"(a_frag));
  asm("mov.b32 %0, %0;" : "+r"(a_dst));
  asm("mov.b32 %0, %0;" : "+r"(a_wrap));
  const int64_t sample_elems = static_cast<int64_t>(q.hp) * q.wp_w * q.c_pad;
  const int64_t batch_rows = p.n * q.h_out;  // patch tiles: the batch's output rows
  // Patch tiles: this CTA's tile along x, its rank in the tile's split of K and its chunks
  // c_begin .. c_end - 1 (per tap: all).
  int tile_x = blockIdx.x, rank = 0, c_begin = 0, c_end = chunks;
  if constexpr (kPatch) {
    if (q.split > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      rank = static_cast<int>(cg::this_cluster().block_rank());
#elif defined(__CUDA_ARCH__)
      __trap();  // the host splits K only where sm_90 code runs
#endif
      tile_x = blockIdx.x / q.split;
      c_begin = rank * chunks / q.split;
      c_end = (rank + 1) * chunks / q.split;
    }
  }
  const int my_steps = (c_end - c_begin) * p.khw;

  for (int64_t n = blockIdx.z; n < (kPatch && q.span ? 1 : p.n); n += gridDim.z) {
    // The tile: its sample n0 (the first, for tiles across samples), this thread's tile pixel
    // as an output offset (px_off), the X' source of this thread's copies (per tap) or the
    // patch (patch tiles: patch_src, its 16-byte copies, this lane's X' row b_frag).
    int64_t n0 = n, px_off;
    int valid;  // the tile's pixels
    const T* b_base = nullptr;
    const T* patch_src = nullptr;  // this thread's first patch copy's source (chunk 0)
    int patch_pixels = 0;
    if constexpr (kPatch) {
      // Output rows g0 .. g_end - 1 of the batch's rows (n * h_out + oh).
      const int64_t g0 = q.span ? static_cast<int64_t>(tile_x) * q.out_rows
                                : n * q.h_out + static_cast<int64_t>(tile_x) * q.out_rows;
      const int64_t g_end = min(g0 + q.out_rows, q.span ? batch_rows : (n + 1) * q.h_out);
      n0 = g0 / q.h_out;
      valid = static_cast<int>(g_end - g0) * p.w_out;
      // xp rows (n * hp + ih) from the first output row's to the last one's last tap.
      const int64_t first = n0 * q.hp + (g0 - n0 * q.h_out) * p.stride_h;
      const int64_t n_last = (g_end - 1) / q.h_out;
      const int64_t last =
          n_last * q.hp + (g_end - 1 - n_last * q.h_out) * p.stride_h + (p.kh - 1) * p.dil_h;
      patch_src = reinterpret_cast<const T*>(q.xp) + first * q.wp_w * q.c_pad + ra * q.c_pad + col;
      patch_pixels = static_cast<int>(last - first + 1) * q.wp_w;
      // A tile pixel's (g, ow): its patch row (g's xp row less first) and column.
      auto patch_pixel = [&](int px, int64_t& g, int& ow) {
        g = g0 + px / p.w_out;
        ow = px - static_cast<int>(g - g0) * p.w_out;
        const int64_t gn = g / q.h_out;
        return static_cast<int>(gn * q.hp + (g - gn * q.h_out) * p.stride_h - first) * q.wp_w +
               ow * p.stride_w;
      };
      int64_t g;
      int ow;
      const int b_row = patch_pixel(min(b_px, valid - 1), g, ow);
      b_frag = smem0 + kPatch0 + b_row * kPitch + b_half;
      const int px = tid % kPixels;
      if (px < valid) {
        patch_pixel(px, g, ow);
        const int64_t gn = g / q.h_out;
        px_off = (gn - n0) * p.c_out * static_cast<int64_t>(p.pixels) +
                 (g - gn * q.h_out) * p.w_out + ow;
      } else {
        px_off = -1;
      }
    } else {
      const int tile_p0 = blockIdx.x * kPixels;
      valid = p.pixels - tile_p0;
      px_off = map_pixel(p, tile_p0 + tid % kPixels);
      b_base = reinterpret_cast<const T*>(q.xp) + n * sample_elems;
      asm("mov.b64 %0, %0;" : "+l"(b_base));  // computed once a sample, not once a copy
    }
    const SampleView<scalar_t> v(p, n0);
    // (Of a split tile, rank 0 writes the zeros of the masked channels.)
    const int rows =
        tc_tile_rows<kPixels, kRows>(p, v, tile_c0, rank == 0 ? px_off : -1, out_ch, warp_count);
    if (rows == 0) continue;
    const bool active = wm < rows && wpx < valid;  // warp-uniform
    // Running source pointers of the next copies. Rows past the tile's kept ones are not
    // copied: whatever their shared rows hold reaches only accumulator rows the epilogue never
    // reads (a row of the product depends on that row of W' alone).
    const T* a_src[kACopies];
    bool a_copy[kACopies];
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      const int m = ra + i * kRowsAtOnce;
      a_copy[i] = m < rows;  // (m < kRows too: rows <= kRows)
      const int row = !a_copy[i] ? 0 : q.ranked ? tile_c0 + m : out_ch[m];
      a_src[i] = reinterpret_cast<const T*>(q.wp) + row * row_elems + col +
                 c_begin * kPkC;  // (patch tiles: the first chunk's tap 0)
    }
    int b_off = 0;  // per tap: the next copies' tap and chunk offset, the same for every pixel
    int i_chunk = 0, i_kw = 0, i_tap = 0;  // the next copies' step
    unsigned stage_w = 0;  // byte offset of the stage the next copies fill

    // The copies of the next step (issued in step order).
    auto issue = [&]() {
      const int a_move = kPatch && i_tap == p.khw - 1 ? a_wrap : a_step;
#pragma unroll
      for (int i = 0; i < kACopies; ++i) {
        if (a_copy[i]) cp_async16(a_dst + stage_w + i * kRowsAtOnce * kPitch, a_src[i]);
        a_src[i] += a_move;
      }
      if constexpr (kPatch) {
        i_tap = i_tap == p.khw - 1 ? 0 : i_tap + 1;
      } else {
#pragma unroll
        for (int i = 0; i < kBCopies; ++i) {
          if (ra + i * kRowsAtOnce < kPixels) {  // compile-time where kPixels is a multiple
            cp_async16(b_dst + stage_w + i * kRowsAtOnce * kPitch, b_base + b_pixel[i] + b_off);
          }
        }
        b_off += kPkC;
        if (++i_chunk == chunks) {
          i_chunk = 0;
          const bool h_carry = ++i_kw == p.kw;
          i_kw = h_carry ? 0 : i_kw;
          b_off += h_carry ? next_kh : next_kw;
        }
      }
      stage_w = stage_w == (kPkStages - 1) * kStage ? 0 : stage_w + kStage;
    };
    // Patch tiles: chunk c's 32 channels of every patch pixel into patch buffer `buffer`, the
    // threads' copies laid out as W''s (pixels ra + kRowsAtOnce i, column col; a loop of its
    // own, run once a chunk).
    auto issue_patch = [&](int c, unsigned buffer) {
      const T* src = patch_src + c * kPkC;
      unsigned dst = a_dst + kPatch0 + buffer;
#pragma unroll 1
      for (int px = ra; px < patch_pixels; px += kRowsAtOnce) {
        cp_async16(dst, src);
        dst += kRowsAtOnce * kPitch;
        src += kRowsAtOnce * q.c_pad;
      }
    };

    float acc[2][4] = {};
    if constexpr (kPatch) {
      if (my_steps > 0) issue_patch(c_begin, 0);  // (no input channel kept: xp is empty)
    }
#pragma unroll
    for (int s = 0; s < kPkStages - 1; ++s) {
      if (s < my_steps) issue();
      cp_async_commit();
    }
    unsigned stage_r = 0;
    // Patch tiles: the step's tap (r_tap, r_kw) and chunk (r_chunk), its X' rows' move in the
    // patch (r_move) and patch buffer (r_buffer).
    int r_tap = 0, r_kw = 0, r_chunk = c_begin;
    unsigned r_move = 0, r_buffer = 0;
#pragma unroll 1  // one step a trip (the roofline's count of a step is one trip's SASS)
    for (int s = 0; s < my_steps; ++s) {
      cp_async_wait<kPkStages - 2>();  // this thread's copies of step s have landed
      // Everyone's have, and step s - 1's reads of the stage refilled below are done (patch
      // tiles: at a chunk's first step, every read of the previous chunk's patch too).
      __syncthreads();
      if constexpr (kPatch) {
        if (r_tap == 0 && r_chunk + 1 < c_end) issue_patch(r_chunk + 1, r_buffer ^ q.patch_bytes);
      }
      if (s + kPkStages - 1 < my_steps) issue();
      cp_async_commit();
      if (active) {
        const unsigned b_at = kPatch ? b_frag + r_buffer + r_move : b_frag + stage_r;
#pragma unroll
        for (int k = 0; k < kSlices; ++k) {
          uint32_t a[4], b[4];
          ldsm_x4(a, a_frag + stage_r + k * 32);
          ldsm_x4(b, b_at + k * 32);
          mma_16x8<T>(acc[0], a, b[0], b[1]);
          mma_16x8<T>(acc[1], a, b[2], b[3]);
        }
      }
      stage_r = stage_r == (kPkStages - 1) * kStage ? 0 : stage_r + kStage;
      if constexpr (kPatch) {  // the next tap (block-uniform branches)
        if (++r_tap == p.khw) {
          r_tap = 0, r_kw = 0, r_move = 0, ++r_chunk;
          r_buffer ^= q.patch_bytes;
        } else if (++r_kw == p.kw) {
          r_kw = 0, r_move += tap_h;
        } else {
          r_move += tap_w;
        }
      }
    }
    cp_async_wait<0>();  // (only empty groups remain)
    __syncthreads();     // every read of the stages is done: the accumulators may alias them
    if (active) {
      // m16n8 accumulators: d0, d1 at (row lane / 4, pixels 2 (lane % 4) + 0, 1), d2, d3 8 rows on.
      const int r = wm + lane / 4, c = wpx + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        c_s[r][c + 8 * j] = acc[j][0];
        c_s[r][c + 8 * j + 1] = acc[j][1];
        c_s[r + 8][c + 8 * j] = acc[j][2];
        c_s[r + 8][c + 8 * j + 1] = acc[j][3];
      }
    }
    int m_begin = 0, m_end = rows;  // the rows this CTA writes out
    if constexpr (kPatch) {
      if (q.split > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // Every CTA of the tile has its partial tile in c_s; rank r sums rows m_begin ..
        // m_end - 1 of all of them (in rank order) into its own c_s, whose rows the others do
        // not read, then writes those rows out.
        const cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();
        const int share = (rows + q.split - 1) / q.split;
        m_begin = min(rows, rank * share), m_end = min(rows, m_begin + share);
        for (int i = tid; i < (m_end - m_begin) * kPixels; i += kThreads) {
          float* own = &c_s[m_begin + i / kPixels][i % kPixels];
          float sum = 0.0f;
          for (int r = 0; r < q.split; ++r) sum += *cluster.map_shared_rank(own, r);
          *own = sum;
        }
#endif
      }
    }
    __syncthreads();
    tc_epilogue<kPixels>(p, v, c_s, out_ch, m_begin, m_end, px_off);
    if constexpr (kPatch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // No CTA of the tile still reads this one's c_s (which the next tile's copies reuse).
      if (q.split > 1) cg::this_cluster().sync();
#endif
    }
  }
}


// pack_kernel's two jobs (x -> xp, weight -> wp), the same copy: an (images, channels, h, w)
// tensor with any strides into (images, h + 2 pad_h, w + 2 pad_w, c_pad), zero padding and zero
// channels past `channels`, packed channel c read from source channel index[c] where a list of
// kept channels is given (a static bool in_mask: the kept ones first, the masked ones never
// read), packed row r read from source row rows[r] where a list of rows is given (the weight's
// kept output channels under a static out_mask: the others never packed), each value times
// scale[image * scale_s0 + c * scale_s1] (rounded to scalar_t) where scale is given, float32
// rounded to TF32. A block takes 32 padded pixels by 32
// channels of one image: read with lanes along pixels (4 loads a thread in flight), transposed
// through shared memory, written with lanes along channels (a 128-byte row a pixel for float32).
// Grid (the x job's pixel tiles, then the weight job's; channel tiles; images, looped past
// 65535).
template <typename scalar_t>
struct PackJob {
  const scalar_t* src;
  const scalar_t* scale;  // nullptr: none
  const int64_t* index;   // source channel of each packed one (`channels` of them); nullptr: c
  const int64_t* rows;    // source row of each packed one (h of them); nullptr: the row itself
  scalar_t* dst;
  int64_t images, s_image, scale_s0, scale_s1;
  int s_c, s_h, s_w;  // within an image (packed_fits: its offsets fit 32 bits)
  int channels, h, w, pad_h, pad_w, hp, wp_w, c_pad, pixel_tiles;
};

constexpr int kPackTile = 32;
constexpr int kPackRows = kThreads / kPackTile;  // 8: rows of the block, 4 trips of each

// One block's tile (pixel tile pt) of job j, for each of its images.
template <typename scalar_t>
__device__ inline void pack_tile(const PackJob<scalar_t>& j, int pt) {
  using acc_t = float;
  __shared__ acc_t tile[kPackTile][kPackTile + 1];
  const int lane = threadIdx.x % kPackTile, row = threadIdx.x / kPackTile;
  const int c0 = blockIdx.y * kPackTile;
  const int padded = j.hp * j.wp_w;
  // Read side: this lane's padded pixel and its input position.
  const int q = pt * kPackTile + lane;
  const int hq = q / j.wp_w;
  const int ih = hq - j.pad_h, iw = q - hq * j.wp_w - j.pad_w;
  const bool inside = q < padded && static_cast<unsigned>(ih) < static_cast<unsigned>(j.h) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(j.w);
  const int src_h = inside && j.rows != nullptr ? static_cast<int>(j.rows[ih]) : ih;
  constexpr int kTrips = kPackTile / kPackRows;
  // This thread's source offsets inside an image, hoisted out of the loop.
  int off[kTrips];
  bool ok[kTrips];
#pragma unroll
  for (int i = 0; i < kTrips; ++i) {
    const int c = c0 + row + i * kPackRows;
    ok[i] = inside && c < j.channels;
    const int src_c = ok[i] && j.index != nullptr ? static_cast<int>(j.index[c]) : c;
    off[i] = ok[i] ? src_c * j.s_c + src_h * j.s_h + iw * j.s_w : 0;
  }
  for (int64_t image = blockIdx.z; image < j.images; image += gridDim.z) {
    __syncthreads();  // the previous image's reads of the tile are done
    // The image's pointers once, opaque to the compiler (which would otherwise rebuild each
    // access's 64-bit address from the image index: four instructions, not one).
    const scalar_t* src = j.src + image * j.s_image;
    asm("mov.b64 %0, %0;" : "+l"(src));
    acc_t v[kTrips];
#pragma unroll
    for (int i = 0; i < kTrips; ++i) v[i] = ok[i] ? static_cast<acc_t>(src[off[i]]) : acc_t(0);
    if (j.scale != nullptr) {  // where a value was read (padding stays 0)
#pragma unroll
      for (int i = 0; i < kTrips; ++i) {
        const int c = c0 + row + i * kPackRows;
        if (ok[i]) {
          v[i] = static_cast<acc_t>(static_cast<scalar_t>(
              v[i] * static_cast<acc_t>(j.scale[image * j.scale_s0 + c * j.scale_s1])));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kTrips; ++i) tile[row + i * kPackRows][lane] = v[i];
    __syncthreads();
    // Write side: lane = channel, rows = padded pixels.
    scalar_t* dst = j.dst + (image * padded + pt * kPackTile) * j.c_pad + c0 + lane;
    asm("mov.b64 %0, %0;" : "+l"(dst));
#pragma unroll
    for (int i = 0; i < kTrips; ++i) {
      const int r = row + i * kPackRows;
      if (pt * kPackTile + r < padded) {
        acc_t value = tile[lane][r];
        if constexpr (std::is_same_v<scalar_t, float>) value = wmma::__float_to_tf32(value);
        dst[r * j.c_pad] = static_cast<scalar_t>(value);
      }
    }
  }
}

// The x job's pixel tiles first, then the weight's (each branch reads its job from parameter
// space).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const PackJob<scalar_t> x_job, const PackJob<scalar_t> w_job) {
  const int pt = blockIdx.x;
  if (pt < x_job.pixel_tiles) {
    pack_tile(x_job, pt);
  } else {
    pack_tile(w_job, pt - x_job.pixel_tiles);
  }
}

// The packed path's workspace and its one pack launch.
struct Packed {
  at::Tensor xp, wp;
  int hp, wp_w, c_pad;
};

// The packed operands' channels: the kept input channels rounded up to a whole K step.
int64_t packed_channels(int64_t kept_in) {
  return (kept_in + kPkC - 1) / kPkC * kPkC;
}

// Whether the packed kernel fits g: a sample's xp and the weight's wp rows (all C_in channels
// at most) within 32-bit offsets, and the grids' limits. Which in_masks it takes is the caller's
// choice (none, a soft one, a static bool one with its kept list).
bool packed_fits(const at::Tensor& x, const masked_conv::Geometry& g) {
  const int64_t c_pad = packed_channels(g.c_in);
  const int64_t hp = g.h + 2 * g.padding[0], wp_w = g.w + 2 * g.padding[1];
  int64_t x_extent = 0;  // the largest offset inside a sample of x
  for (int d = 1; d < 4; ++d) x_extent += (x.size(d) - 1) * x.stride(d);
  return hp * wp_w * c_pad <= kIntMax && g.c_out * g.kh * g.kw * c_pad <= kIntMax &&
         x_extent <= kIntMax && g.c_out * g.c_in * g.kh * g.kw <= kIntMax &&
         c_pad / kPkC <= 65535 &&            // pack_kernel's grid.y
         (g.c_out + kTileM / 2 - 1) / (kTileM / 2) <= 65535;  // 32-row tiles' grid.y
}

template <typename scalar_t>
PackJob<scalar_t> pack_job(const at::Tensor& src, const scalar_t* scale, int64_t scale_s0,
                           int64_t scale_s1, const at::Tensor& index, at::Tensor& dst, int pad_h,
                           int pad_w, int c_pad, const at::Tensor& rows = at::Tensor()) {
  PackJob<scalar_t> j{};
  j.src = src.const_data_ptr<scalar_t>();
  j.scale = scale;
  j.index = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
  j.rows = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  j.dst = dst.mutable_data_ptr<scalar_t>();
  j.images = src.size(0);
  j.s_image = src.stride(0);
  j.s_c = static_cast<int>(src.stride(1));
  j.s_h = static_cast<int>(src.stride(2));
  j.s_w = static_cast<int>(src.stride(3));
  j.scale_s0 = scale_s0, j.scale_s1 = scale_s1;
  j.channels = static_cast<int>(index.defined() ? index.size(0) : src.size(1));
  j.h = static_cast<int>(rows.defined() ? rows.size(0) : src.size(2));
  j.w = static_cast<int>(src.size(3));
  j.pad_h = pad_h, j.pad_w = pad_w;
  j.hp = j.h + 2 * pad_h, j.wp_w = j.w + 2 * pad_w, j.c_pad = c_pad;
  j.pixel_tiles = (j.hp * j.wp_w + kPackTile - 1) / kPackTile;
  return j;
}

// x (any strides) and weight packed by one launch; p's soft in_mask (in_scale) applied to x;
// in_index (int64, on x's device), where defined, lists the input channels to pack, in order;
// out_index likewise the weight's output channels (wp's rows in the order of their ranks).
template <typename scalar_t>
Packed pack(const at::Tensor& x, const at::Tensor& weight, const Params<scalar_t>& p,
            const masked_conv::Geometry& g, const at::Tensor& in_index,
            const at::Tensor& out_index, cudaStream_t stream) {
  Packed k;
  k.c_pad = static_cast<int>(packed_channels(in_index.defined() ? in_index.size(0) : g.c_in));
  k.hp = static_cast<int>(g.h + 2 * g.padding[0]);
  k.wp_w = static_cast<int>(g.w + 2 * g.padding[1]);
  k.xp = at::empty({g.n, k.hp, k.wp_w, k.c_pad}, x.options());
  k.wp = at::empty({out_index.defined() ? out_index.size(0) : g.c_out, g.kh, g.kw, k.c_pad},
                   x.options());
  if (k.wp.size(0) == 0) return k;  // no output channel kept: no products
  if (k.c_pad == 0) return k;  // no input channel (kept): nothing to pack, no products
  // (A listed pack reads scale by packed channel: the two never come together, as an in_mask is
  // either bool or soft.)
  TORCH_INTERNAL_ASSERT(!(in_index.defined() && p.in_scale != nullptr));
  // wp[o, t, c] = weight[o, c, t]: one image of C_out x taps pixels (rows o, columns t) and C_in
  // channels (the listed ones), so that the weight's tiles are full.
  const int64_t taps = g.kh * g.kw;
  const at::Tensor w4 = weight.as_strided({1, g.c_in, g.c_out, taps},
                                          {weight.numel(), taps, g.c_in * taps, 1});
  const auto x_job = pack_job<scalar_t>(x, p.in_scale, p.in_s0, p.in_s1, in_index, k.xp,
                                        p.pad_h, p.pad_w, k.c_pad);
  const auto w_job =
      pack_job<scalar_t>(w4, nullptr, 0, 0, in_index, k.wp, 0, 0, k.c_pad, out_index);
  const dim3 grid(static_cast<unsigned>(x_job.pixel_tiles + w_job.pixel_tiles),
                  static_cast<unsigned>(k.c_pad / kPackTile),
                  static_cast<unsigned>(std::min<int64_t>(g.n, 65535)));
  pack_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x_job, w_job);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return k;
}

// The static out_mask's epilogue in one pass: out[n, c] = y[n, rank(c)] + bias[c] for the kept
// output channels c (rank: position among the kept ones) and exactly 0 for the others, in NCHW
// or channels_last, replacing the bias gather, the bias add, the zero fill and index_copy_. Each
// block builds the channel -> rank map of the mask in shared memory (ballot scans), then a warp
// per row: an (n, c) plane of `len` pixels (NCHW) or an (n, pixel) row of `len` = C channels
// (channels_last), lanes along the row (coalesced on both sides).
constexpr int kScatterThreads = 256;
constexpr int kScatterWarps = kScatterThreads / 32;
static_assert(kScatterThreads == kThreads, "block_rank works on blocks of kThreads");

template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kScatterThreads)
    scatter_kept_channels_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ bias,
                                 const bool* __restrict__ mask, int64_t mask_stride,
                                 scalar_t* __restrict__ out, int64_t rows, int len, int channels,
                                 int kept) {
  extern __shared__ int slot[];  // channels: rank of a kept channel, -1 for a masked one
  __shared__ int warp_count[kWarps];
  using acc_t = at::opmath_type<scalar_t>;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int seen = 0;
  for (int c0 = 0; c0 < channels; c0 += kScatterThreads) {
    const int c = c0 + tid;
    const bool keep = c < channels && mask[c * mask_stride];
    int total;
    const int rank = seen + block_rank(keep, warp_count, total);
    if (c < channels) slot[c] = keep ? rank : -1;
    seen += total;
  }
  __syncthreads();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kScatterWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kScatterWarps) {
    scalar_t* out_row = out + row * len;
    if constexpr (kChannelsLast) {  // row = (n, pixel); y's row holds the kept channels
      const scalar_t* y_row = y + row * kept;
      for (int c = lane; c < len; c += 32) {
        const int s = slot[c];
        acc_t v = 0;
        if (s >= 0) {
          v = static_cast<acc_t>(y_row[s]) + (bias != nullptr ? static_cast<acc_t>(bias[c]) : 0);
        }
        out_row[c] = static_cast<scalar_t>(v);
      }
    } else {  // row = (n, c); y's plane (n, rank(c))
      const int64_t n = row / channels;
      const int c = static_cast<int>(row - n * channels);
      const int s = slot[c];
      if (s < 0) {
        for (int i = lane; i < len; i += 32) out_row[i] = scalar_t(0);
      } else {
        const scalar_t* y_row = y + (n * kept + s) * len;
        const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
        for (int i = lane; i < len; i += 32) {
          out_row[i] = static_cast<scalar_t>(static_cast<acc_t>(y_row[i]) + b);
        }
      }
    }
  }
}

void check_operands(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const masked_conv::Geometry& g,
                    const std::optional<at::Tensor>& in_mask,
                    const std::optional<at::Tensor>& out_mask) {
  TORCH_CHECK(x.is_cuda(), "masked_conv2d (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "masked_conv2d (cuda): weight must be on x's device (",
              x.device(), "), got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.c_out,
                "masked_conv2d: bias must have shape (", g.c_out, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "masked_conv2d: bias must have x's dtype (",
                x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "masked_conv2d (cuda): bias must be on x's device (",
                x.device(), "), got ", bias->device());
  }
  masked_conv::check_mask(in_mask, g.n, g.c_in, x, "in_mask");
  masked_conv::check_mask(out_mask, g.n, g.c_out, x, "out_mask");
}

// Whether float32 convolutions may run in TF32: PyTorch's cuDNN convolution flag
// (torch.backends.cudnn.allow_tf32, or torch.backends.cudnn.conv.fp32_precision), read on the
// host at each call, so a flag changed between calls takes effect as it does for F.conv2d.
bool tf32_allowed() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

// Whether the per-sample kernels run dtype on tensor cores: bf16 and fp16 always, float32 where
// TF32 is allowed.
bool on_tensor_cores(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || (dtype == at::kFloat && tf32_allowed());
}

// kKernel's dynamic shared memory limit raised to kSmem where that passes the 48 KiB default,
// once per device (the attribute is per device and kernel).
template <auto kKernel, size_t kSmem>
void allow_smem() {
  if constexpr (kSmem > 48 * 1024) {
    constexpr int kMaxDevices = 64;
    static std::once_flag raised[kMaxDevices];
    const int device = c10::cuda::current_device();
    TORCH_CHECK(device >= 0 && device < kMaxDevices, "masked_conv2d (cuda): device index ",
                device, " beyond ", kMaxDevices);
    std::call_once(raised[device], [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kSmem)));
    });
  }
}

// masked_conv2d_tc_kernel with its two stages of dynamic shared memory; above the 48 KiB default
// the kernel's limit is raised first, once per device.
template <typename scalar_t>
void launch_tc(const Params<scalar_t>& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = tc_smem_bytes<scalar_t>();
  allow_smem<masked_conv2d_tc_kernel<scalar_t>, smem>();
  masked_conv2d_tc_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(p);
}

// Tensor cores for bf16 / fp16 always, for float32 where TF32 is allowed (TF32 products, float
// sums, as cuDNN runs the dense convolution); full-precision float32 and float64 on the FMA
// kernel. Sets p's K-step counters and grid's pixel tiles for the chosen kernel.
template <typename scalar_t>
void launch_per_sample(Params<scalar_t>& p, dim3 grid, cudaStream_t stream) {
  constexpr bool k16 = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  bool tensor_cores = k16;
  if constexpr (std::is_same_v<scalar_t, float>) tensor_cores = tf32_allowed();
  const int k_step = tensor_cores ? kTcK : kTileK;
  const int tile_p = tensor_cores ? kTcP : kTileP;
  grid.x = static_cast<unsigned>((p.pixels + tile_p - 1) / tile_p);
  p.step_c = k_step / p.khw;
  p.step_r = k_step % p.khw;
  p.step_kh = p.step_r / p.kw;
  p.step_kw = p.step_r % p.kw;
  if constexpr (k16) {
    launch_tc(p, grid, stream);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      launch_tc(p, grid, stream);
    } else {
      masked_conv2d_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    masked_conv2d_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
  }
}

// The packed kernel's tiling of a problem. Tiles of 32 output channels by 64 pixels where a
// sample has more than 32 output pixels or tiles run across samples: the same instructions per
// product as 64 x 32, and a tile's rows past the kept channels, which still cost their copies
// and barriers, are fewer (a 25% per-sample mask of 128 channels keeps 32: one 32-row tile, where
// a 64-row tile runs half empty); 64 x 32 for the smaller maps inside a sample. Patch tiles
// (whole output rows, X' from shared memory) where the map's rows fit a tile, the kernel has
// kPatchMinTaps taps or more and the two patch buffers leave 2 CTAs an SM (kPatchMaxSmem);
// across samples where their output channels are the same (no per-sample out_mask or scale).
struct PackedTiling {
  int rows = kTileM;        // output channels a tile (by 2048 / rows pixels)
  bool patch = false;       // X' from a patch of xp (else copied per tap)
  bool span = false;        // patch tiles: across samples
  int out_rows = 0;         // patch tiles: output rows a tile
  int64_t pixel_tiles = 0;  // a sample's pixel tiles (span: the batch's)
  int64_t patch_bytes = 0;  // patch tiles: a patch buffer
  // The CTAs that compute for `kept` output channels of n samples (the grid's tiles past them
  // only write zeros).
  int64_t ctas(int64_t n, int64_t kept) const {
    return (span ? 1 : n) * pixel_tiles * ((kept + rows - 1) / rows);
  }
};

// shared_rows: every sample has the same output channels; c_pad: the packed channels; esize:
// bytes an element.
PackedTiling packed_tiling(const masked_conv::Geometry& g, bool shared_rows, int64_t c_pad,
                           int64_t esize) {
  const int64_t pixels = g.h_out * g.w_out;
  PackedTiling t;
  const bool span = shared_rows && g.n > 1;
  t.rows = pixels > kTcP || span ? kTileM / 2 : kTileM;
  const int64_t tile_pixels = kTileM * kTcP / t.rows;
  if (g.kh * g.kw >= kPatchMinTaps && g.w_out <= tile_pixels && g.n > 0) {
    const int64_t rows_all = span ? g.n * g.h_out : g.h_out;
    const int64_t r = std::min(tile_pixels / g.w_out, rows_all);
    const int64_t tiles = (rows_all + r - 1) / r;
    // The largest patch, in xp rows: a tile of `count` output rows from row `start` of a sample
    // reads (count - 1) stride_h + (kh - 1) dilation_h + 1 rows of it and, for each sample
    // boundary it crosses, hp - h_out stride_h rows more (the rows between the two samples'
    // runs). Span tiles start at every multiple of r, whose offsets in a sample repeat within
    // h_out tiles.
    const int64_t hp = g.h + 2 * g.padding[0];
    const int64_t gap = hp - g.h_out * g.stride[0];
    int64_t most = 0;
    for (int64_t i = 0; i < std::min(tiles, g.h_out); ++i) {
      const int64_t start = (i * r) % g.h_out;
      const int64_t count = span ? r : std::min(r, g.h_out - start);
      const int64_t crossings = (start + count - 1) / g.h_out;
      most = std::max(most, crossings * gap + (count - 1) * g.stride[0] +
                                (g.kh - 1) * g.dilation[0] + 1);
    }
    const int64_t wp_w = g.w + 2 * g.padding[1];
    const int64_t patch_bytes = most * wp_w * static_cast<int64_t>(pk_pitch(esize));
    if (pk_smem_bytes(esize, t.rows, true, patch_bytes) <= kPatchMaxSmem &&
        most * wp_w * c_pad <= kIntMax &&
        tiles <= kIntMax) {
      t.patch = true, t.span = span, t.out_rows = static_cast<int>(r);
      t.pixel_tiles = tiles, t.patch_bytes = patch_bytes;
      return t;
    }
  }
  t.rows = pixels > kTcP ? kTileM / 2 : kTileM;  // per tap: tiles inside a sample
  t.pixel_tiles = (pixels + kTileM * kTcP / t.rows - 1) / (kTileM * kTcP / t.rows);
  return t;
}

// The CTAs a patch tile's K is split over: where the grid's CTAs (ctas, each running `chunks`
// chunks) leave SMs idle, the split (at most kMaxSplit, a portable cluster, and a chunk a CTA)
// that needs the fewest rounds of CTAs an SM relative to it (the smallest such split): e.g. 64
// CTAs on 132 SMs split in 2.
constexpr int kMaxSplit = 8;

int packed_split(int64_t ctas, int64_t chunks, int64_t sms) {
  int best = 1;
  if (ctas <= 0 || ctas >= sms) return best;
  double best_cost = 1.0;
  for (int s = 2; s <= std::min<int64_t>(kMaxSplit, chunks); ++s) {
    const double cost = static_cast<double>((ctas * s + sms - 1) / sms) / s;
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

// masked_conv2d_tc_packed_kernel<scalar_t, kRows, kPatch> on q with the tiling t; the dynamic
// shared memory limit raised first where needed (per tap: float32's four stages, 54 KiB; patch
// tiles: up to kPatchMaxSmem). Patch tiles split their K (packed_split) over clusters where sm_90
// code runs (q.split; 1 otherwise).
template <typename scalar_t, int kRows, bool kPatch>
void launch_packed_kernel(PackedParams<scalar_t> q, const PackedTiling& t, dim3 grid,
                          int64_t kept_out, cudaStream_t stream) {
  constexpr auto kernel = masked_conv2d_tc_packed_kernel<scalar_t, kRows, kPatch>;
  constexpr size_t kESize = sizeof(typename TensorCore<scalar_t>::T);
  const size_t smem = pk_smem_bytes(kESize, kRows, kPatch, t.patch_bytes);
  allow_smem<kernel, kPatch ? kPatchMaxSmem : pk_smem_bytes(kESize, kRows, kPatch)>();
  grid.y = static_cast<unsigned>((q.p.c_out + kRows - 1) / kRows);
  q.split = 1;
  if constexpr (kPatch) {
    const int device = c10::cuda::current_device();
    if (has_sm90_image(kernel, device)) {
      q.split = packed_split(
          t.ctas(q.p.n, kept_out), q.c_pad / kPkC,
          at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    }
  }
  if (q.split > 1) {
    grid.x *= static_cast<unsigned>(q.split);
    launch_clusters(kernel, grid, kThreads, smem, stream, static_cast<unsigned>(q.split), q);
  } else {
    kernel<<<grid, kThreads, smem, stream>>>(q);
  }
}

// The packed path: pack_kernel, then masked_conv2d_tc_packed_kernel. p.x is unused there (x is
// read through its strides). out_index: a static out_mask's kept channels where known on the
// host (only their weight rows are packed), else undefined (per-sample or soft masks, or a
// static one not seen before during graph capture: all C_out rows).
template <typename scalar_t>
void launch_packed(const Params<scalar_t>& p, const at::Tensor& x, const at::Tensor& weight,
                   const masked_conv::Geometry& g, const at::Tensor& in_index,
                   const at::Tensor& out_index, dim3 grid, cudaStream_t stream) {
  const Packed k = pack(x, weight, p, g, in_index, out_index, stream);
  const int64_t kept_out = out_index.defined() ? out_index.size(0) : g.c_out;
  PackedParams<scalar_t> q{};
  q.p = p;
  q.xp = k.xp.const_data_ptr<scalar_t>();
  q.wp = k.wp.const_data_ptr<scalar_t>();
  q.hp = k.hp, q.wp_w = k.wp_w, q.c_pad = k.c_pad;
  q.ranked = out_index.defined();
  const bool shared_rows = (p.out_mask == nullptr && p.out_scale == nullptr) || p.out_s0 == 0;
  const PackedTiling t = packed_tiling(g, shared_rows, k.c_pad, x.element_size());
  q.out_rows = t.out_rows, q.span = t.span, q.h_out = static_cast<int>(g.h_out);
  q.patch_bytes = static_cast<unsigned>(t.patch_bytes);
  grid.x = static_cast<unsigned>(t.pixel_tiles);
  if (t.span) grid.z = 1;
  if (t.rows == kTileM / 2) {
    if (t.patch) {
      launch_packed_kernel<scalar_t, kTileM / 2, true>(q, t, grid, kept_out, stream);
    } else {
      launch_packed_kernel<scalar_t, kTileM / 2, false>(q, t, grid, kept_out, stream);
    }
  } else if (t.patch) {
    launch_packed_kernel<scalar_t, kTileM, true>(q, t, grid, kept_out, stream);
  } else {
    launch_packed_kernel<scalar_t, kTileM, false>(q, t, grid, kept_out, stream);
  }
}

struct MaskArgs {
  const void* ptr = nullptr;  // nullptr: all kept (bool) / no scale (float)
  bool soft = false;          // a float mask: scales
  int64_t sample_stride = 0, channel_stride = 0;
};

// A (C,) mask repeats over the samples (sample stride 0).
MaskArgs mask_args(const std::optional<at::Tensor>& mask) {
  MaskArgs a;
  if (!mask.has_value()) return a;
  a.ptr = mask->const_data_ptr();
  a.soft = mask->scalar_type() != at::kBool;
  if (mask->dim() == 1) {
    a.channel_stride = mask->stride(0);
  } else {
    a.sample_stride = mask->stride(0), a.channel_stride = mask->stride(1);
  }
  return a;
}

// Static masks compact the problem for cuDNN, which needs the kept counts on the host: their
// indices come from masked_conv::KeptIndexCache, a nonzero() (host synchronisation) only the
// first time a mask version is seen. CUDA graph capture forbids that synchronisation: while the
// current stream is capturing, masks not seen before take the per-sample kernel instead (it
// reads the masks on the device; a (C,) mask is a stride-0 row for every sample) and backward
// the dense engine.
bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

bool must_not_sync(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b) {
  return (a.has_value() || b.has_value()) && capturing() &&
         !(masked_conv::kept_known(a) && masked_conv::kept_known(b));
}

// Whether per_sample_forward's size limits (checked there) hold for g.
bool per_sample_fits(const masked_conv::Geometry& g, int64_t pixels) {
  bool ok = g.h * g.w <= kIntMax && pixels <= kIntMax - kTileP && g.c_in <= kIntMax &&
            g.c_out <= kIntMax && g.kh * g.kw <= (1 << 20) && g.c_in * g.kh * g.kw <= kIntMax &&
            (g.c_out + kTileM - 1) / kTileM <= 65535;
  for (int i = 0; i < 2; ++i) {
    ok = ok && (i == 0 ? g.h : g.w) < (1 << 29) && g.padding[i] < (1 << 29) &&
         g.stride[i] < (1 << 29) && g.dilation[i] * ((i == 0 ? g.kh : g.kw) - 1) < (1 << 29);
  }
  return ok;
}

// The per-sample kernel. in_mask and out_mask may be soft (float, x's dtype; checked by the
// caller); raw, if given, receives the unscaled output (contiguous NCHW, like the kernel's).
at::Tensor per_sample_forward(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const masked_conv::Geometry& g,
                              const std::optional<at::Tensor>& in_mask,
                              const std::optional<at::Tensor>& out_mask,
                              at::Tensor* raw = nullptr) {
  const auto format = x.suggest_memory_format();
  if (raw != nullptr) *raw = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options());
  if (g.n == 0 || g.c_out == 0) {
    return at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options(), format);
  }
  // 32-bit index math inside a sample; offsets between samples and channels are 64-bit.
  const int64_t pixels = g.h_out * g.w_out;
  TORCH_CHECK(g.h * g.w <= kIntMax && pixels <= kIntMax - kTileP && g.c_in <= kIntMax &&
                  g.c_out <= kIntMax && g.kh * g.kw <= (1 << 20) &&
                  g.c_in * g.kh * g.kw <= kIntMax,
              "masked_conv2d (cuda): per-sample masks support at most 2^31 - 1 pixels and "
              "channels per sample, 2^20 kernel positions and 2^31 - 1 weights per output "
              "channel");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK((i == 0 ? g.h : g.w) < (1 << 29) && g.padding[i] < (1 << 29) &&
                    g.stride[i] < (1 << 29) &&
                    g.dilation[i] * ((i == 0 ? g.kh : g.kw) - 1) < (1 << 29),
                "masked_conv2d (cuda): height, width, stride, padding and dilation * (kernel - 1) "
                "must be < 2^29 with per-sample masks");
  }
  const int64_t c_tiles = (g.c_out + kTileM - 1) / kTileM;
  TORCH_CHECK(c_tiles <= 65535, "masked_conv2d (cuda): at most ", 65535 * kTileM,
              " output channels with per-sample masks, got ", g.c_out);

  // The packed kernel (tensor cores) reads x through its strides; it takes no in_mask, a soft
  // one, or a static bool one, whose kept channels the pack lists first (their indices cached
  // per mask version: not while a graph captures a mask not seen before). A per-sample bool
  // in_mask keeps the gathering kernel, which skips each sample's masked channels.
  const bool bool_in = in_mask.has_value() && in_mask->scalar_type() == at::kBool;
  const bool packed = on_tensor_cores(x.scalar_type()) && packed_fits(x, g) &&
                      (!bool_in || (!masked_conv::per_sample(in_mask) &&
                                    !must_not_sync(in_mask, std::nullopt)));
  const at::Tensor in_index =
      packed && bool_in ? masked_conv::kept(in_mask, g.c_in, x) : at::Tensor();
  const bool static_out = out_mask.has_value() && out_mask->scalar_type() == at::kBool &&
                          !masked_conv::per_sample(out_mask) &&
                          masked_conv::kept_known(out_mask);
  const at::Tensor out_index =
      packed && static_out ? masked_conv::kept(out_mask, g.c_out, x) : at::Tensor();
  const at::Tensor xc = packed ? x : x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const MaskArgs in_m = mask_args(in_mask), out_m = mask_args(out_mask);
  at::Tensor out = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options());

  const dim3 grid(1,  // pixel tiles: set by launch_per_sample
                  static_cast<unsigned>(c_tiles),
                  static_cast<unsigned>(std::min<int64_t>(g.n, 65535)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_cuda",
                                  [&] {
    Params<scalar_t> p{};
    p.x = xc.const_data_ptr<scalar_t>();
    p.weight = wc.const_data_ptr<scalar_t>();
    p.bias = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    p.out = out.mutable_data_ptr<scalar_t>();
    // (On the packed path a bool in_mask is in in_index: the kernel reads no mask of inputs.)
    p.in_mask = in_m.soft || packed ? nullptr : static_cast<const bool*>(in_m.ptr);
    p.in_scale = in_m.soft ? static_cast<const scalar_t*>(in_m.ptr) : nullptr;
    p.out_mask = out_m.soft ? nullptr : static_cast<const bool*>(out_m.ptr);
    p.out_scale = out_m.soft ? static_cast<const scalar_t*>(out_m.ptr) : nullptr;
    p.raw = raw != nullptr ? raw->mutable_data_ptr<scalar_t>() : nullptr;
    p.in_s0 = in_m.sample_stride, p.in_s1 = in_m.channel_stride;
    p.out_s0 = out_m.sample_stride, p.out_s1 = out_m.channel_stride;
    p.n = g.n;
    p.c_in = static_cast<int>(g.c_in);
    p.h = static_cast<int>(g.h);
    p.w = static_cast<int>(g.w);
    p.c_out = static_cast<int>(g.c_out);
    p.kh = static_cast<int>(g.kh);
    p.kw = static_cast<int>(g.kw);
    p.w_out = static_cast<int>(g.w_out);
    p.pixels = static_cast<int>(pixels);
    p.khw = p.kh * p.kw;
    p.stride_h = static_cast<int>(g.stride[0]), p.stride_w = static_cast<int>(g.stride[1]);
    p.pad_h = static_cast<int>(g.padding[0]), p.pad_w = static_cast<int>(g.padding[1]);
    p.dil_h = static_cast<int>(g.dilation[0]), p.dil_w = static_cast<int>(g.dilation[1]);
    if constexpr (!std::is_same_v<scalar_t, double>) {  // (no packed kernel for float64)
      if (packed) {
        launch_packed(p, xc, wc, g, in_index, out_index, grid, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    launch_per_sample(p, grid, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (raw != nullptr && format != at::MemoryFormat::Contiguous) *raw = raw->contiguous(format);
  return format == at::MemoryFormat::Contiguous ? out : out.contiguous(format);
}

// Static masks with an out_mask: the kept rows of weight gathered (and its kept columns where
// an in_mask is given, with x's kept channels), cuDNN without bias on the kept channels, and
// scatter_kept_channels_kernel writing the whole output with the bias: 3 launches (5 with an
// in_mask) where masked_conv::static_forward takes 6 (8): weight and bias gathers, convolution,
// bias add, zero fill, index_copy_. The cases it does not cover (nothing kept, an empty batch,
// more channels than the rank map holds) take masked_conv::static_forward.
// The rank map in dynamic shared memory, with the kernel's static 32 bytes, within the 48 KB a
// launch may take without opting in.
constexpr int64_t kScatterMaxChannels = 12000;

at::Tensor static_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const masked_conv::Geometry& g,
                               const std::optional<at::Tensor>& in_mask,
                               const std::optional<at::Tensor>& out_mask) {
  const int64_t pixels = g.h_out * g.w_out;
  if (!out_mask.has_value() || g.n == 0 || g.c_out > kScatterMaxChannels || pixels > kIntMax) {
    return masked_conv::static_forward(x, weight, bias, g, in_mask, out_mask);
  }
  const at::Tensor out_idx = masked_conv::kept(out_mask, g.c_out, x);
  const at::Tensor in_idx = in_mask.has_value() ? masked_conv::kept(in_mask, g.c_in, x)
                                                : at::Tensor();
  const int64_t k_out = out_idx.size(0);
  if (k_out == 0 || (in_idx.defined() && in_idx.size(0) == 0)) {
    return masked_conv::static_forward(x, weight, bias, g, in_mask, out_mask);
  }
  at::Tensor w = weight.index_select(0, out_idx);
  if (in_idx.defined()) w = w.index_select(1, in_idx);
  const auto format = x.suggest_memory_format();
  const at::Tensor y = masked_conv::compact_conv(
      x, w, std::nullopt, g, in_idx, format,
      [](const at::Tensor& t, const at::Tensor& i, at::MemoryFormat f) {
        return t.index_select(1, i).contiguous(f);
      });
  at::Tensor out = at::empty({g.n, g.c_out, g.h_out, g.w_out}, x.options().memory_format(format));
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t rows = channels_last ? g.n * pixels : g.n * g.c_out;
  const int len = static_cast<int>(channels_last ? g.c_out : pixels);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t fill = sms * (2048 / kScatterThreads);  // every SM full
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>((rows + kScatterWarps - 1) / kScatterWarps, fill));
  const size_t smem = sizeof(int) * static_cast<size_t>(g.c_out);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "masked_conv2d_cuda_scatter", [&] {
    const scalar_t* b = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    if (channels_last) {
      scatter_kept_channels_kernel<scalar_t, true><<<blocks, kScatterThreads, smem, stream>>>(
          y.const_data_ptr<scalar_t>(), b, out_mask->const_data_ptr<bool>(), out_mask->stride(0),
          out.mutable_data_ptr<scalar_t>(), rows, len, static_cast<int>(g.c_out),
          static_cast<int>(k_out));
    } else {
      scatter_kept_channels_kernel<scalar_t, false><<<blocks, kScatterThreads, smem, stream>>>(
          y.const_data_ptr<scalar_t>(), b, out_mask->const_data_ptr<bool>(), out_mask->stride(0),
          out.mutable_data_ptr<scalar_t>(), rows, len, static_cast<int>(g.c_out),
          static_cast<int>(k_out));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Static masks on the packed tensor-core kernel instead of cuDNN on the compacted problem, where
// the kernel's serial work is short. Its CTAs (packed_tiling's pixel tiles x row tiles of the
// kept output channels, before any K split) fill `rounds` of the GPU's CTA slots (kPkMinBlocks
// an SM), each running taps x ceil(kept input channels / 32) K steps; the packed path is taken
// where rounds x steps is at most kStaticPackedMaxSteps (cuDNN's route: the weight gather, a
// bool in_mask's x gather, the convolution with its NCHW transposes, the scatter or bias pass).
// The limit is the roofline model's (benchmarks/roofline.py, with cuDNN's float32 times as an
// H200 run measured them: ~12 us a convolution before its FLOPs, and the transposes; 3 x 3
// convolutions of 1-128 samples, 32-512 channels, 4 x 4 to 56 x 56 maps, 25-75% kept): with
// patch tiles the path chosen takes on average 0.4% (in_mask) / 0.6% (out_mask alone) more
// time than the faster one. The packed kernel itself is not measured yet. Decided from the
// shapes, the dtype, the TF32 flag and the kept counts (cached per mask version, as the cuDNN
// path needs them; the caller has made sure they are known or may be computed), so the same
// call always takes the same kernels. benchmarks/roofline.py's _cuda_static_packed mirrors this
// rule.
constexpr int64_t kStaticPackedMaxSteps = 144;

bool static_on_tensor_cores(const at::Tensor& x, const masked_conv::Geometry& g,
                            const std::optional<at::Tensor>& in_mask,
                            const std::optional<at::Tensor>& out_mask) {
  if (!in_mask.has_value() && !out_mask.has_value()) return false;  // dense: cuDNN
  const int64_t pixels = g.h_out * g.w_out;
  if (!on_tensor_cores(x.scalar_type()) || g.n == 0 || !per_sample_fits(g, pixels) ||
      !packed_fits(x, g)) {
    return false;
  }
  const int64_t k_out = out_mask.has_value() ? masked_conv::kept(out_mask, g.c_out, x).size(0)
                                             : g.c_out;
  const int64_t k_in = in_mask.has_value() ? masked_conv::kept(in_mask, g.c_in, x).size(0)
                                           : g.c_in;
  const int64_t ctas =
      packed_tiling(g, true, packed_channels(k_in), x.element_size()).ctas(g.n, k_out);
  const int64_t slots =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
      kPkMinBlocks;
  const int64_t rounds = (ctas + slots - 1) / slots;
  const int64_t steps = g.kh * g.kw * (packed_channels(k_in) / kPkC);
  return rounds * steps <= kStaticPackedMaxSteps;
}

at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              const std::optional<at::Tensor>& in_mask,
                              const std::optional<at::Tensor>& out_mask) {
  const masked_conv::Geometry g =
      masked_conv::geometry(x, weight, stride, padding, dilation, groups);
  check_operands(x, weight, bias, g, in_mask, out_mask);
  const c10::cuda::CUDAGuard guard(x.device());
  if (g.groups > 1) return masked_conv::dense_forward(x, weight, bias, g, in_mask, out_mask);
  if (!masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask) &&
      !must_not_sync(in_mask, out_mask) && !static_on_tensor_cores(x, g, in_mask, out_mask)) {
    return static_forward_cuda(x, weight, bias, g, in_mask, out_mask);
  }
  return per_sample_forward(x, weight, bias, g, in_mask, out_mask);
}

// t (x's shape) in the layout at::empty_like(x, x.suggest_memory_format()) gives, strides of
// size-1 dims included, as F.conv2d's input gradient has it. t already in that layout (the usual
// case) is returned as it is; otherwise a copy (e.g. one channel, where a contiguous t is also
// channels_last to is_contiguous but its channel stride differs).
static at::Tensor like_empty_like(const at::Tensor& x, const at::Tensor& t) {
  const auto format = x.suggest_memory_format();
  // As torch's own strides: a 0-sized dim counts as 1.
  const int64_t c = std::max<int64_t>(x.size(1), 1), h = std::max<int64_t>(x.size(2), 1),
                w = std::max<int64_t>(x.size(3), 1);
  const std::array<int64_t, 4> want =
      format == at::MemoryFormat::ChannelsLast
          ? std::array<int64_t, 4>{h * w * c, 1, w * c, c}
          : std::array<int64_t, 4>{c * h * w, h * w, w, 1};
  if (t.strides() == at::IntArrayRef(want)) return t;
  return at::empty_strided(x.sizes(), want, t.options()).copy_(t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask) {
  const masked_conv::Geometry g =
      masked_conv::geometry(x, weight, stride, padding, dilation, groups);
  check_operands(x, weight, std::nullopt, g, in_mask, out_mask);
  TORCH_CHECK(grad.device() == x.device(), "masked_conv2d backward (cuda): grad must be on x's "
              "device (", x.device(), "), got ", grad.device());
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.n, g.c_out, g.h_out, g.w_out}),
              "masked_conv2d backward: grad must have shape (", g.n, ", ", g.c_out, ", ", g.h_out,
              ", ", g.w_out, "), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  if (g.groups == 1 && !masked_conv::per_sample(in_mask) && !masked_conv::per_sample(out_mask) &&
      !must_not_sync(in_mask, out_mask)) {
    return masked_conv::static_backward(grad, x, weight, g, in_mask, out_mask);
  }
  if (masked_conv::transposable(g) && grad.scalar_type() != at::kDouble) {
    // grad_x with the per-sample kernel (masked output channels skipped in the reduction,
    // masked input channels written as zeros); the weight and bias gradients densely.
    const masked_conv::Transposed t = masked_conv::transposed(grad, weight, g);
    at::Tensor gx = like_empty_like(
        x, per_sample_forward(grad, t.weight, std::nullopt, t.geometry, out_mask, in_mask));
    auto [unused, gw, gb] =
        masked_conv::dense_backward(grad, x, weight, g, in_mask, out_mask, /*x_grad=*/false);
    return {gx, gw, gb};
  }
  return masked_conv::dense_backward(grad, x, weight, g, in_mask, out_mask);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_scaled_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& in_mask, const std::optional<at::Tensor>& out_mask,
    bool raw) {
  const masked_conv::Geometry g = masked_conv::geometry(x, weight, stride, padding, dilation, 1);
  check_operands(x, weight, bias, g, std::nullopt, std::nullopt);
  masked_conv::check_mask(in_mask, g.n, g.c_in, x, "in_mask", /*soft_ok=*/true);
  masked_conv::check_mask(out_mask, g.n, g.c_out, x, "out_mask", /*soft_ok=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor unscaled;
  at::Tensor out = per_sample_forward(x, weight, bias, g, in_mask, out_mask,
                                      raw ? &unscaled : nullptr);
  return {out, raw ? unscaled : at::empty({0}, x.options())};
}

}  // namespace

at::Tensor channel_conv_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& in_index,
                             const std::optional<at::Tensor>& out_index, int64_t channels) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(),
              "_channel_conv (cuda): x and weight must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  return masked_conv::channel_conv(x, weight, bias, stride, padding, dilation, in_index,
                                   out_index, channels);
}

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d_cuda);
  m.impl("_masked_conv2d_backward", &masked_conv2d_backward_cuda);
  m.impl("_channel_conv", &channel_conv_cuda);
  m.impl("_masked_conv2d_scaled", &masked_conv2d_scaled_cuda);
}

}  // namespace pyprune
