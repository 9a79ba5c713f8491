// Counter-based randomness shared by the CPU and CUDA kernels, mirrored bit for bit by
// triton_kernels/noise.py (tl.philox is the same Philox4x32-10).
//
// A call's stream is named by a seed tensor of two int64 drawn from a torch.Generator on the
// input's device: (key, stream). Value i of the call (an element, or a draw) comes from
//
//     words = Philox4x32-10(key, counter = (i >> 2, stream))        (128-bit counter)
//     bits  = words[i & 3]
//
// so four consecutive values share one Philox evaluation, any thread can produce any value (no
// state, no host sync: kernels read the seed tensor from device memory, which CUDA graphs can
// capture, or take its pair by value where the tensor is on the host: SeedArg), and backward
// regenerates exactly the forward's values. Uniforms keep the top 24
// bits: u = (bits >> 8) * 2^-24 in [0, 1), exact in float32. Normals (Box-Muller) pair lanes
// (0, 1) and (2, 3) of one evaluation.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

// #pragma unroll for nvcc's device passes; host compilers have no such pragma (GCC warns).
#ifdef __CUDACC__
#define PYPRUNE_UNROLL _Pragma("unroll")
#else
#define PYPRUNE_UNROLL
#endif

namespace pyprune {

struct Philox4 {
  uint32_t w[4];
};

// The seed tensor's (key, stream) pair.
struct Seed {
  uint64_t key;
  uint64_t stream;
};

// A GPU kernel's seed argument: the seed tensor's pair read from device memory (ptr), or taken
// by value (ptr null) where the tensor is on the host (an eager call draws its seed there, with
// no kernel: pyprune/ops/_random.py). Made by seed_arg (csrc/sap.h).
struct SeedArg {
  const int64_t* ptr;
  int64_t stride;
  uint64_t key, stream;

  C10_HOST_DEVICE Seed load() const {
    return ptr ? Seed{static_cast<uint64_t>(ptr[0]), static_cast<uint64_t>(ptr[stride])}
               : Seed{key, stream};
  }
};

C10_HOST_DEVICE inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox4x32-10 round (Salmon et al., SC'11): the round function of tl.philox and curand.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
C10_HOST_DEVICE inline void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                         uint32_t k0, uint32_t k1) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
  const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10 of M counters (one stream) side by side, with one key schedule for all of them
// (the key's two additions a round are shared; a lone evaluation spends about a fifth of its
// instructions on them) and M independent chains for the multiplier's latency. philox() is the
// one-counter case.
template <int M>
C10_HOST_DEVICE inline void philox_n(uint64_t key, const uint64_t (&counter)[M], uint64_t stream,
                                     Philox4 (&out)[M]) {
  uint32_t c[M][4];
PYPRUNE_UNROLL
  for (int m = 0; m < M; ++m) {
    c[m][0] = static_cast<uint32_t>(counter[m]);
    c[m][1] = static_cast<uint32_t>(counter[m] >> 32);
    c[m][2] = static_cast<uint32_t>(stream);
    c[m][3] = static_cast<uint32_t>(stream >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
PYPRUNE_UNROLL
  for (int round = 0; round < 10; ++round) {
PYPRUNE_UNROLL
    for (int m = 0; m < M; ++m) philox_round(c[m][0], c[m][1], c[m][2], c[m][3], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
PYPRUNE_UNROLL
  for (int m = 0; m < M; ++m) out[m] = {{c[m][0], c[m][1], c[m][2], c[m][3]}};
}

C10_HOST_DEVICE inline Philox4 philox(uint64_t key, uint64_t counter, uint64_t stream) {
  const uint64_t counters[1] = {counter};
  Philox4 out[1];
  philox_n(key, counters, stream, out);
  return out[0];
}

// u in [0, 1) from the top 24 bits (exact in float).
C10_HOST_DEVICE inline float to_uniform(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// Exp(1) from bits: -log(1 - u), 1 - u in (0, 1] so the log is finite.
C10_HOST_DEVICE inline float to_exponential(uint32_t bits) {
  return -logf(1.0f - to_uniform(bits));
}

// Two N(0, 1) values from two words (Box-Muller): r * (cos, sin)(2 pi u1), r = sqrt(-2 log(1 - u0)).
C10_HOST_DEVICE inline void to_normal_pair(uint32_t b0, uint32_t b1, float& n0, float& n1) {
  const float radius = sqrtf(-2.0f * logf(1.0f - to_uniform(b0)));
  const float theta = 6.283185307179586f * to_uniform(b1);
  n0 = radius * cosf(theta);
  n1 = radius * sinf(theta);
}

}  // namespace pyprune
