// The AVX2 + FMA build of csrc/cpu/kwta.cpp (csrc/cpu/isa.h).
#define PYPRUNE_CPU_AVX2
#include "../kwta.cpp"
