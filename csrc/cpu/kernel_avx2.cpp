// The kernel for CPUs with AVX2, FMA and F16C, selected at run time (csrc/cpu/adagrad_cpu.cpp).
#include "kernel.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>  // F16C conversions (kernel_impl.h, KERNEL_F16_LANES)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define KERNEL_NAMESPACE avx2
#define KERNEL_HAS_FMA 1
#define KERNEL_F16_LANES 8
#include "kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
