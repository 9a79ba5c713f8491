// Philox4x32-10 blocks for the CPU kernels (csrc/cpu/philox.h), compiled for each instruction
// set (csrc/cpu/isa.h). AVX2 has no 32-bit high multiply, and the compiler's widening of a
// scalar Philox loop costs about twice the arithmetic; here eight counters run per vector with
// the products of even and odd lanes taken by two _mm256_mul_epu32 and blended.
#include <cstdint>

#include "../random.h"
#include "isa.h"

#if PYPRUNE_HAVE_AVX2
#include <immintrin.h>
#endif

PYPRUNE_ISA_BEGIN
#include "philox.h"

#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
namespace {

// hi and lo 32 bits of a * m for eight lanes (m: one constant in every lane).
inline void mul_hilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256i splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// Evaluations for counters first .. first + 8 * kGroups - 1 into words[.][t ..]: csrc/random.h's
// philox_round on kGroups independent vectors of eight lanes. One vector's ten rounds are a
// chain of dependent multiplies; interleaving two keeps the multiplier busy (on this project's
// CPU the Philox part of gaussian_noise took about 45% less time, the whole op single-threaded
// at 128x64x32x32 42 -> 38 ms).
template <int kGroups>
inline void philox8(const Seed& seed, uint64_t first, uint32_t (&words)[4][kPhiloxBlock], int t) {
  __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int i = 0; i < 8; ++i) {
      const uint64_t counter = first + 8 * g + i;
      lo[i] = static_cast<uint32_t>(counter);
      hi[i] = static_cast<uint32_t>(counter >> 32);
    }
    c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    c2[g] = splat(static_cast<uint32_t>(seed.stream));
    c3[g] = splat(static_cast<uint32_t>(seed.stream >> 32));
  }
  uint32_t k0 = static_cast<uint32_t>(seed.key), k1 = static_cast<uint32_t>(seed.key >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = splat(k0), key1 = splat(k1);
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hilo(c0[g], splat(kPhiloxM0), hi0, lo0);
      mul_hilo(c2[g], splat(kPhiloxM1), hi1, lo1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), key0);
      c1[g] = lo1;
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), key1);
      c3[g] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int g = 0; g < kGroups; ++g) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + t + 8 * g), c0[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + t + 8 * g), c1[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + t + 8 * g), c2[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + t + 8 * g), c3[g]);
  }
}

}  // namespace
#endif

void philox_lanes(const Seed& seed, uint64_t first, int count, uint32_t (&words)[4][kPhiloxBlock]) {
  int t = 0;
#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
  for (; t + 16 <= count; t += 16) philox8<2>(seed, first + t, words, t);
  for (; t + 8 <= count; t += 8) philox8<1>(seed, first + t, words, t);
#endif
  // The rest (all of it in the baseline build), one evaluation at a time.
  for (; t < count; ++t) {
    const Philox4 w = philox(seed.key, first + static_cast<uint64_t>(t), seed.stream);
    for (int lane = 0; lane < 4; ++lane) words[lane][t] = w.w[lane];
  }
}

PYPRUNE_ISA_END
