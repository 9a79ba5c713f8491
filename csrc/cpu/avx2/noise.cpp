// The AVX2 + FMA build of csrc/cpu/noise.cpp (csrc/cpu/isa.h).
#define PYPRUNE_CPU_AVX2
#include "../noise.cpp"
