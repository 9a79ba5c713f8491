// Branch-free float approximations for the CPU random kernels (sap.cpp, noise.cpp): loops over
// blocks of values that call them vectorize, where libm's scalar log1pf / expm1f / sinf / cosf
// would take most of the time. Relative errors are ~1e-7 (checked against float64 in
// tests/test_sap.py and tests/test_noise.py through the ops).
#pragma once

#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>

#include "../sap.h"  // kExpm1C*

namespace pyprune {

// Round to nearest for |t| < 2^22, by adding and removing 1.5 * 2^23 (std::nearbyint is a libm
// call without SSE4.1, which stops vectorization).
inline float round_to_int(float t) {
  constexpr float kMagic = 12582912.0f;
  return (t + kMagic) - kMagic;
}

// log(v) for finite v > 0: v = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to s^9.
inline float fast_log(float v) {
  const uint32_t bits = c10::bit_cast<uint32_t>(v);
  const int32_t e = static_cast<int32_t>(bits - 0x3f3504f3u) >> 23;
  const float m = c10::bit_cast<float>(bits - (static_cast<uint32_t>(e) << 23));
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return static_cast<float>(e) * 0.69314718055994531f + 2.0f * s * series;
}

// exp(y) for y <= 0: 2^k * 2^f with k = round(y log2 e), |f| <= 1/2, 2^f by its Taylor
// polynomial in f ln 2 (degree 7). Below -87 the result is flushed to 0.
inline float fast_exp(float y) {
  const float t = (y < -87.0f ? -87.0f : y) * 1.4426950408889634f;
  const float k = round_to_int(t);
  const float g = (t - k) * 0.69314718055994531f;
  const float p = 1.0f + g * (1.0f + g * (0.5f + g * (1.0f / 6 + g * (1.0f / 24 + g * (1.0f / 120 +
                  g * (1.0f / 720 + g * (1.0f / 5040)))))));
  const float scale = c10::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  return y < -87.0f ? 0.0f : p * scale;
}

// (sin, cos)(2 pi u), u in [0, 1): the nearest quarter turn k/4 is split off, the rest
// (|a| <= pi/4) goes through Taylor polynomials, and the quadrant rotates the pair.
inline void fast_sincos_turns(float u, float& sin_out, float& cos_out) {
  const float k = round_to_int(4.0f * u);
  const float a = 6.283185307179586f * (u - 0.25f * k), a2 = a * a;
  const float sn = a * (1.0f + a2 * (-1.0f / 6 + a2 * (1.0f / 120 + a2 * (-1.0f / 5040 + a2 * (1.0f / 362880)))));
  const float cs = 1.0f + a2 * (-0.5f + a2 * (1.0f / 24 + a2 * (-1.0f / 720 + a2 * (1.0f / 40320))));
  const int q = static_cast<int>(k) & 3;
  sin_out = (q == 0) ? sn : (q == 1) ? cs : (q == 2) ? -sn : -cs;
  cos_out = (q == 0) ? cs : (q == 1) ? -sn : (q == 2) ? -cs : sn;
}

// SAP's q = -expm1(r * log1p(-p)), p in [0, 1]: log1p(-p) by its series while p < 2^-7
// (truncation p^5 / 5, below float rounding), else log(1 - p) with Goldberg's correction;
// expm1(y) by the degree-5 minimax polynomial of ../sap.h on [-1/2, 0] (relative error
// 1.5e-9), else 1 - exp(y), where q >= 0.39 absorbs the rounding of exp.
// kSmall: the caller knows p < kSmallKeepP, so the log1p series alone is needed (same result).
constexpr float kSmallKeepP = 0.0078125f;  // p below this takes the series (2^-7)
template <bool kSmall = false>
inline float fast_keep_probability(float p, float r) {
  const float series = -p * (1.0f + p * (0.5f + p * (1.0f / 3 + p * 0.25f)));
  float log1p_neg;
  if constexpr (kSmall) {
    log1p_neg = series;
  } else {
    const float u = 1.0f - p;
    const float goldberg = fast_log(u) * (-p / (u - 1.0f));
    log1p_neg = p < kSmallKeepP ? series : goldberg;
  }
  const float y = r * log1p_neg;
  float e = kExpm1C5;  // expm1(y) = y e(y)
  e = kExpm1C4 + y * e;
  e = kExpm1C3 + y * e;
  e = kExpm1C2 + y * e;
  e = kExpm1C1 + y * e;
  e = 1.0f + y * e;
  const float q = y < -0.5f ? 1.0f - fast_exp(y) : -y * e;
  return p >= 1.0f ? 1.0f : q;
}

}  // namespace pyprune
