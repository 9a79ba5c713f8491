// The AVX2 + FMA build of csrc/cpu/philox.cpp (csrc/cpu/isa.h).
#define PYPRUNE_CPU_AVX2
#include "../philox.cpp"
