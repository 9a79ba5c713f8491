// Philox4x32-10 blocks for the CPU kernels (csrc/cpu/philox.h), compiled for each instruction
// set (csrc/cpu/isa.h). AVX2 has no 32-bit high multiply, and the compiler's widening of
// csrc/random.h's loop costs about twice the arithmetic; here eight counters run per vector
// with the products of even and odd lanes taken by two _mm256_mul_epu32 and blended.
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

}  // namespace

void philox_lanes(const Seed& seed, uint64_t first, int count, uint32_t (&words)[4][kPhiloxBlock]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i s0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed.stream)));
  const __m256i s1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed.stream >> 32)));
  const uint32_t key0 = static_cast<uint32_t>(seed.key), key1 = static_cast<uint32_t>(seed.key >> 32);
  int t = 0;
  for (; t + 8 <= count; t += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int i = 0; i < 8; ++i) {
      const uint64_t counter = first + static_cast<uint64_t>(t + i);
      lo[i] = static_cast<uint32_t>(counter);
      hi[i] = static_cast<uint32_t>(counter >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = s0, c3 = s1;
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hilo(c0, m0, hi0, lo0);
      mul_hilo(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + t), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + t), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + t), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + t), c3);
  }
  for (; t < count; ++t) {
    const Philox4 w = philox(seed.key, first + static_cast<uint64_t>(t), seed.stream);
    for (int lane = 0; lane < 4; ++lane) words[lane][t] = w.w[lane];
  }
}
#else
void philox_lanes(const Seed& seed, uint64_t first, int count, uint32_t (&words)[4][kPhiloxBlock]) {
  philox_block(seed, first, count, words);
}
#endif

PYPRUNE_ISA_END
