// CPU kernels are compiled twice: for the baseline instruction set and, through the wrappers in
// csrc/cpu/avx2/, for AVX2 + FMA; each op picks one at run time. A kernel file:
//
//     #include <ATen/...>          // every header first: they stay baseline code
//     #include "isa.h"
//     PYPRUNE_ISA_BEGIN            // namespace pyprune::PYPRUNE_ISA, AVX2 code in the AVX2 build
//     ... kernels, entry points ...
//     PYPRUNE_ISA_END
//     #ifndef PYPRUNE_CPU_AVX2     // the op itself, once: checks, then PYPRUNE_CPU_KERNEL(...)
//     ...
//     #endif
//
// Only code after PYPRUNE_ISA_BEGIN is compiled for AVX2, in its own namespace, so no inline
// function of a header is ever emitted as AVX2 code that a baseline caller could link to.
// The two builds differ only in vector width: floating-point contraction is off (setup.py:
// -ffp-contract=off), so elementwise results are bit-identical and seeded streams agree.
//
// PYPRUNE_CPU_ISA=baseline forces the baseline kernels (tests compare both).
#pragma once

#include <cstdlib>
#include <cstring>

// -DPYPRUNE_HAVE_AVX2=0 builds the baseline kernels only (what other compilers and processors get).
#ifndef PYPRUNE_HAVE_AVX2
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYPRUNE_HAVE_AVX2 1
#else
#define PYPRUNE_HAVE_AVX2 0
#endif
#endif

#if defined(PYPRUNE_CPU_AVX2) && PYPRUNE_HAVE_AVX2
#define PYPRUNE_ISA avx2
#define PYPRUNE_ISA_BEGIN                     \
  _Pragma("GCC push_options")                 \
  _Pragma("GCC target(\"avx2,fma,bmi,bmi2\")") \
  namespace pyprune {                         \
  namespace avx2 {
#define PYPRUNE_ISA_END \
  }                     \
  }                     \
  _Pragma("GCC pop_options")
#else
#define PYPRUNE_ISA baseline
#define PYPRUNE_ISA_BEGIN \
  namespace pyprune {     \
  namespace baseline {
#define PYPRUNE_ISA_END \
  }                     \
  }
#endif

namespace pyprune {

// True when the AVX2 kernels are built and this CPU runs them, unless PYPRUNE_CPU_ISA=baseline.
inline bool use_avx2() {
#if PYPRUNE_HAVE_AVX2
  static const bool supported = [] {
    __builtin_cpu_init();  // idempotent; needed if this first runs during static initialization
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  }();
  const char* forced = std::getenv("PYPRUNE_CPU_ISA");
  return supported && !(forced != nullptr && std::strcmp(forced, "baseline") == 0);
#else
  return false;
#endif
}

}  // namespace pyprune

// Calls the entry point `name` of the instruction set chosen by use_avx2().
#if PYPRUNE_HAVE_AVX2
#define PYPRUNE_CPU_KERNEL(name, ...) \
  (::pyprune::use_avx2() ? ::pyprune::avx2::name(__VA_ARGS__) : ::pyprune::baseline::name(__VA_ARGS__))
#else
#define PYPRUNE_CPU_KERNEL(name, ...) (::pyprune::baseline::name(__VA_ARGS__))
#endif

// Declares an entry point in both instruction-set namespaces, for the op's dispatching code
// (before PYPRUNE_CPU_KERNEL; not in the AVX2 build, whose definitions carry the target).
#define PYPRUNE_CPU_DECLARE(ret, name, ...) \
  namespace pyprune {                       \
  namespace avx2 {                          \
  ret name(__VA_ARGS__);                    \
  }                                         \
  namespace baseline {                      \
  ret name(__VA_ARGS__);                    \
  }                                         \
  }
