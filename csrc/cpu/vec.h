// ATen's Vectorized types at the width of the build flags (-march=native in setup.py): AVX-512,
// AVX2, else the portable default. Include it before any other ATen header.
#pragma once
#if defined(__AVX512F__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>
