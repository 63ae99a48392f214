// Interface between the CPU op (csrc/cpu/adagrad_cpu.cpp) and the SIMD builds of the kernel.
#pragma once

#include <cstdint>

namespace fused_adagrad::cpu {

// Complex params arrive as real views; they keep their own entries because torch adds their
// weight decay in complex arithmetic (rounded product, then sum) rather than with an FMA.
enum class Dtype : uint8_t { Float, Double, Half, BFloat16, ComplexFloat, ComplexDouble };
constexpr int kNumDtypes = 6;

// One parameter's contiguous run of elements (complex params arrive as real views).
struct Slice {
  void* param;
  const void* grad;
  void* sum;
  double neg_clr;  // -lr / (1 + (step - 1) * lr_decay), already rounded as PyTorch rounds it
};

// All dense params of one (dtype) group. The elements of all slices form one index space,
// [0, ends[count - 1]), which the caller splits evenly over threads.
struct Update {
  const Slice* slices;
  const int64_t* ends;  // ends[k]: cumulative element count up to and including slice k
  int64_t count;
  Dtype dtype;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
};

using UpdateRangeFn = void (*)(const Update& update, int64_t begin, int64_t end);

// The same source (kernel_impl.h) compiled three times with different target flags.
namespace base { void update_range(const Update&, int64_t, int64_t); }
namespace avx2 { void update_range(const Update&, int64_t, int64_t); }
namespace avx512 { void update_range(const Update&, int64_t, int64_t); }

}  // namespace fused_adagrad::cpu
