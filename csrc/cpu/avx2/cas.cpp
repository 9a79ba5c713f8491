// The AVX2 + FMA build of csrc/cpu/cas.cpp (csrc/cpu/isa.h).
#define PYPRUNE_CPU_AVX2
#include "../cas.cpp"
