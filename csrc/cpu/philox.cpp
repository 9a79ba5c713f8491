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

// Evaluations for counters first .. first + 7 into words[.][t .. t + 7]: csrc/random.h's
// philox_round on eight lanes.
inline void philox8(const Seed& seed, uint64_t first, uint32_t (&words)[4][kPhiloxBlock], int t) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int i = 0; i < 8; ++i) {
    lo[i] = static_cast<uint32_t>(first + i);
    hi[i] = static_cast<uint32_t>((first + i) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = splat(static_cast<uint32_t>(seed.stream));
  __m256i c3 = splat(static_cast<uint32_t>(seed.stream >> 32));
  uint32_t k0 = static_cast<uint32_t>(seed.key), k1 = static_cast<uint32_t>(seed.key >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hilo(c0, splat(kPhiloxM0), hi0, lo0);
    mul_hilo(c2, splat(kPhiloxM1), hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), splat(k0));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), splat(k1));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + t), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + t), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + t), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + t), c3);
}

}  // namespace
#endif

void philox_lanes(const Seed& seed, uint64_t first, int count, uint32_t (&words)[4][kPhiloxBlock]) {
  int t = 0;
#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
  for (; t + 8 <= count; t += 8) philox8(seed, first + t, words, t);
#endif
  // The rest (all of it in the baseline build), one evaluation at a time.
  for (; t < count; ++t) {
    const Philox4 w = philox(seed.key, first + static_cast<uint64_t>(t), seed.stream);
    for (int lane = 0; lane < 4; ++lane) words[lane][t] = w.w[lane];
  }
}

PYPRUNE_ISA_END
