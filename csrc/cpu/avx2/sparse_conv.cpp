// The AVX2 + FMA build of csrc/cpu/sparse_conv.cpp (csrc/cpu/isa.h); empty where that build is not
// made (not x86-64 GCC).
#define PYPRUNE_CPU_AVX2
#include "../isa.h"
#if PYPRUNE_HAVE_AVX2
#include "../sparse_conv.cpp"
#endif
