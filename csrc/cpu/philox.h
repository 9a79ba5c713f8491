// Philox blocks for the CPU kernels, in the instruction set of the including kernel: include
// this between PYPRUNE_ISA_BEGIN and PYPRUNE_ISA_END (csrc/cpu/isa.h), after csrc/random.h.
#pragma once

// Philox evaluations for counters first .. first + count - 1 (count <= kPhiloxBlock): lane l of
// evaluation t in words[l][t]. Eight at a time on AVX2 in the AVX2 build (csrc/cpu/philox.cpp).
constexpr int kPhiloxBlock = 64;
void philox_lanes(const Seed& seed, uint64_t first, int count, uint32_t (&words)[4][kPhiloxBlock]);

// Bits of values first .. first + count - 1 of the stream (count <= 4 * kPhiloxBlock - 3: the
// values span at most kPhiloxBlock evaluations).
inline void stream_bits(const Seed& seed, uint64_t first, int count, uint32_t* bits) {
  if (count <= 0) return;
  uint32_t words[4][kPhiloxBlock];
  const uint64_t e0 = first >> 2;
  const int evaluations = static_cast<int>(((first + count - 1) >> 2) - e0 + 1);
  philox_lanes(seed, e0, evaluations, words);
  const int skip = static_cast<int>(first & 3);
  if (skip == 0) {  // whole evaluations: an interleave of the four lanes
    const int whole = count >> 2;
    for (int t = 0; t < whole; ++t)
      for (int lane = 0; lane < 4; ++lane) bits[4 * t + lane] = words[lane][t];
    for (int k = 4 * whole; k < count; ++k) bits[k] = words[k & 3][k >> 2];
    return;
  }
  for (int k = 0; k < count; ++k) {
    const int v = k + skip;
    bits[k] = words[v & 3][v >> 2];
  }
}
