// The kernel for CPUs with AVX-512 F/BW/VL/DQ, selected at run time (csrc/cpu/adagrad_cpu.cpp).
// 512-bit vectors are asked for explicitly: GCC's default tuning stops at 256 bits.
#include "kernel.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>  // F16C conversions (kernel_impl.h, KERNEL_F16_LANES)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")
#endif
#define KERNEL_NAMESPACE avx512
#define KERNEL_HAS_FMA 1
#define KERNEL_F16_LANES 16
#include "kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
