// The kernel for any CPU: the compiler's baseline ISA (SSE2 on x86-64).
#include "kernel.h"

#include <cstdint>
#include <cstring>

#define KERNEL_NAMESPACE base
#define KERNEL_HAS_FMA 0
#define KERNEL_F16_LANES 0
#include "kernel_impl.h"
