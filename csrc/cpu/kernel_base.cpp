// The kernel for any CPU: the compiler's baseline ISA (SSE2 on x86-64, Armv8-A with NEON on
// aarch64).
#include "kernel.h"

#include <cstdint>
#include <cstring>

#define KERNEL_NAMESPACE base
#if defined(__aarch64__)
// torch's Vectorized<float>::fmadd and Vectorized<double>::fmadd on aarch64 are fused
// (vfmaq_f32 / vfmaq_f64, aten/src/ATen/cpu/vec/vec128/vec128_{float,double}_neon.h), and every
// Armv8-A CPU has the FMA instruction: the portable kernel fuses at the same places there, to
// stay bitwise with torch. tests/kernel_check (run under qemu by .ci/aarch64.sh) checks that it
// fuses exactly there.
#define KERNEL_HAS_FMA 1
#else
// x86-64's baseline has no FMA, and torch's portable (ATEN_CPU_CAPABILITY=default) build
// computes a * b + c with two roundings.
#define KERNEL_HAS_FMA 0
#endif
#define KERNEL_F16_LANES 0
#include "kernel_impl.h"
