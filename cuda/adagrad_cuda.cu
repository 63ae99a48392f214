// CUDA implementation of fused_adagrad::adagrad_step_. Per device: one launch increments every
// device-resident step, then one multi-tensor launch per dtype (more when the tensors do not
// fit one argument table) updates param and sum in a single pass over param, grad and sum.
// The dense path never reads a device value on the host, so it can be captured in a CUDA graph.
#include "../csrc/cpu/backend.h"
#include "../csrc/plan.h"
#include "multi_tensor_apply.cuh"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fused_adagrad::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Device side

// Where a tensor's step count comes from: a float32 on the device (incremented by an earlier
// launch), or, when the state keeps the step on the host, the value the host incremented.
struct StepRef {
  const float* device;
  double host;
};

// The learning rate: a one-element device tensor read by the kernel, or a host number.
// `host_is_float` marks the value of a float32 host tensor: torch then divides in float32.
struct LearningRate {
  const float* device_float;
  const double* device_double;
  double host;
  bool host_is_float;
};

struct Hyper {
  LearningRate lr;
  double lr_decay;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
  bool fma_weight_decay;  // false for the real views of complex params
};

// The 4 KB table fits every GPU; the 32 KB one moves ~8x more work per launch.
using SmallTable = ChunkTable<3, StepRef, 32, 384>;
using LargeTable = ChunkTable<3, StepRef, 256, 3328>;
static_assert(sizeof(SmallTable) + sizeof(Hyper) <= kSmallArgBytes, "kernel argument too large");
static_assert(sizeof(LargeTable) + sizeof(Hyper) <= kLargeArgBytes, "kernel argument too large");

template <int N>
struct StepList {
  float* step[N];
  int count;
};
using SmallStepList = StepList<500>;
using LargeStepList = StepList<4000>;
static_assert(sizeof(SmallStepList) <= kSmallArgBytes, "kernel argument too large");
static_assert(sizeof(LargeStepList) <= kLargeArgBytes, "kernel argument too large");

template <typename S> struct MathTypeOf { using type = float; };
template <> struct MathTypeOf<double> { using type = double; };

__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
// A rounded product and a rounded sum that nvcc may not contract into an FMA.
__device__ __forceinline__ float mul_add_(float a, float b, float c) {
  return __fadd_rn(__fmul_rn(a, b), c);
}
__device__ __forceinline__ double mul_add_(double a, double b, double c) {
  return __dadd_rn(__dmul_rn(a, b), c);
}

// x rounded to the storage type S and widened back: torch's for-loop keeps every intermediate
// tensor (g, sum, sqrt, std) in the param's dtype. The identity for float and double.
template <typename S, typename M>
__device__ __forceinline__ M round_to(M x) {
  return static_cast<M>(static_cast<S>(x));
}

// -lr / (1 + (step - 1) * lr_decay), rounded as csrc/plan.h's neg_clr rounds it on the host.
// The explicit _rn operations keep nvcc from contracting the denominator into an FMA, which
// Python's arithmetic (and the CPU build, -ffp-contract=off) does not do.
__device__ __forceinline__ double device_neg_clr(const LearningRate& lr, double step,
                                                 double lr_decay) {
  const double denom = __dadd_rn(1.0, __dmul_rn(__dadd_rn(step, -1.0), lr_decay));
  if (lr.device_float != nullptr) {
    return -static_cast<double>(__fdiv_rn(*lr.device_float, static_cast<float>(denom)));
  }
  if (lr.device_double != nullptr) return -__ddiv_rn(*lr.device_double, denom);
  if (lr.host_is_float) {
    return -static_cast<double>(__fdiv_rn(static_cast<float>(lr.host), static_cast<float>(denom)));
  }
  return -__ddiv_rn(lr.host, denom);
}

template <typename M>
struct Coeffs {
  M neg_clr;
  M weight_decay;  // both rounded to the storage type first, as torch casts its scalars
  M eps;
  bool weight_decay_on;
  bool fma_weight_decay;
  bool maximize;
  bool eps_inside_sqrt;
};

// The element update in csrc/cpu/kernel_impl.h's order: g = -grad if maximize; g += wd * p
// (FMA; a rounded product then a sum for complex params; skipped entirely at wd == 0, as torch
// skips it); sum += g * g (FMA); std = sqrt(sum) + eps, or sqrt(sum + eps);
// p = p + (neg_clr * g) / std. For half and bfloat16 the intermediates are rounded where torch
// stores them; the arithmetic between the roundings is float.
template <typename S, typename M>
__device__ __forceinline__ void update(S& param, const S grad, S& sum, const Coeffs<M>& c) {
  M g = static_cast<M>(grad);
  if (c.maximize) g = -g;
  const M p = static_cast<M>(param);
  if (c.weight_decay_on) {
    g = round_to<S>(c.fma_weight_decay ? fma_(p, c.weight_decay, g)
                                       : mul_add_(p, c.weight_decay, g));
  }
  const M s = round_to<S>(fma_(g, g, static_cast<M>(sum)));
  const M denom = c.eps_inside_sqrt ? round_to<S>(sqrt_(round_to<S>(s + c.eps)))
                                    : round_to<S>(round_to<S>(sqrt_(s)) + c.eps);
  sum = static_cast<S>(s);
  param = static_cast<S>(p + (c.neg_clr * g) / denom);
}

template <typename S, int W>
struct alignas(sizeof(S) * W) Pack {
  S v[W];
};

// Updates `count` packs of W elements. Each thread first issues the loads of U packs of all
// three arrays (3 * U independent requests in flight), then computes and stores them. Pack i
// goes to thread i % kBlockThreads, so a warp reads consecutive addresses.
template <int W, int U, typename S, typename M>
__device__ __forceinline__ void update_packs(S* param, const S* grad, S* sum, int count,
                                             const Coeffs<M>& c) {
  using P = Pack<S, W>;
  P* p = reinterpret_cast<P*>(param);
  const P* g = reinterpret_cast<const P*>(grad);
  P* s = reinterpret_cast<P*>(sum);
  for (int base = threadIdx.x; base < count; base += kBlockThreads * U) {
    P rp[U], rg[U], rs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * kBlockThreads;
      if (i < count) {
        rp[u] = p[i];
        rg[u] = g[i];
        rs[u] = s[i];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * kBlockThreads;
      if (i < count) {
#pragma unroll
        for (int e = 0; e < W; ++e) update(rp[u].v[e], rg[u].v[e], rs[u].v[e], c);
        p[i] = rp[u];
        s[i] = rs[u];
      }
    }
  }
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// One block per (tensor, chunk). Steps were incremented by an earlier launch on the stream, so
// every block of a tensor reads the same, final value: no block writes what another reads.
// (Letting one block of each tensor write step + 1 here would race with the other blocks of
// that tensor, which run in any order and may read the step before or after the write.)
template <typename S, typename Table>
__global__ void __launch_bounds__(kBlockThreads) adagrad_kernel(const Table table, const Hyper h) {
  using M = typename MathTypeOf<S>::type;
  const int t = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunkSize;
  const int n = static_cast<int>(min(kChunkSize, table.numel[t] - start));
  S* param = static_cast<S*>(table.ptr[0][t]) + start;
  const S* grad = static_cast<const S*>(table.ptr[1][t]) + start;
  S* sum = static_cast<S*>(table.ptr[2][t]) + start;

  const StepRef step = table.extra[t];
  const double step_value = step.device != nullptr ? static_cast<double>(*step.device) : step.host;
  Coeffs<M> c;
  c.neg_clr = static_cast<M>(device_neg_clr(h.lr, step_value, h.lr_decay));
  c.weight_decay = round_to<S>(static_cast<M>(h.weight_decay));
  c.eps = round_to<S>(static_cast<M>(h.eps));
  c.weight_decay_on = h.weight_decay != 0;
  c.fma_weight_decay = h.fma_weight_decay;
  c.maximize = h.maximize;
  c.eps_inside_sqrt = h.eps_inside_sqrt;

  // A chunk starts a multiple of 16 bytes after its tensor's start, so it is aligned exactly
  // when the tensors are. 128-bit accesses for the aligned bulk, element accesses otherwise
  // (e.g. a view that starts at element 1) and for the last W - 1 elements.
  constexpr int W = 16 / sizeof(S);
  int done = 0;
  if (aligned16(param) && aligned16(grad) && aligned16(sum)) {
    update_packs<W, 2>(param, grad, sum, n / W, c);
    done = n / W * W;
  }
  update_packs<1, 4>(param + done, grad + done, sum + done, n - done, c);
}

template <int N>
__global__ void increment_steps_kernel(const StepList<N> list) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < list.count) *list.step[i] += 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Host side

// Whether launches on `stream` may take a 32 KB argument: built for it (CUDA >= 12.1, Volta+),
// a driver that supports it, and the stream not being captured into a graph. ATen's
// multi_tensor_apply also keeps to 4 KB arguments under capture; a graph replays the extra
// launches of the small tables cheaply.
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
bool large_kernel_args(cudaStream_t stream) {
  static const bool driver_ok = [] {
    int version = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&version));
    return version >= 12010;
  }();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return driver_ok && capture == cudaStreamCaptureStatusNone;
}
#endif

template <typename List>
void launch_increments(const std::vector<float*>& steps, cudaStream_t stream) {
  constexpr int kMax = static_cast<int>(sizeof(List::step) / sizeof(float*));
  constexpr int kThreads = 256;
  List list;
  for (size_t begin = 0; begin < steps.size(); begin += kMax) {
    list.count = static_cast<int>(std::min<size_t>(kMax, steps.size() - begin));
    std::copy_n(steps.begin() + begin, list.count, list.step);
    increment_steps_kernel<<<(list.count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(list);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void increment_device_steps(const std::vector<float*>& steps, cudaStream_t stream) {
  if (steps.empty()) return;
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
  if (large_kernel_args(stream)) return launch_increments<LargeStepList>(steps, stream);
#endif
  launch_increments<SmallStepList>(steps, stream);
}

using Entry = TensorEntry<3, StepRef>;

template <typename S, typename Table>
void launch_tables(const std::vector<Entry>& entries, const Hyper& hyper, cudaStream_t stream) {
  for_each_table<Table>(entries, [&](const Table& table, int blocks) {
    adagrad_kernel<S, Table><<<blocks, kBlockThreads, 0, stream>>>(table, hyper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename S>
void launch_update(const std::vector<Entry>& entries, const Hyper& hyper, cudaStream_t stream) {
  if (entries.empty()) return;
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
  if (large_kernel_args(stream)) return launch_tables<S, LargeTable>(entries, hyper, stream);
#endif
  launch_tables<S, SmallTable>(entries, hyper, stream);
}

// The kernel's dtype groups. Complex params arrive as their real views but keep groups of their
// own: torch adds their weight decay in complex arithmetic, without an FMA.
enum Slot { kSlotF32, kSlotF64, kSlotF16, kSlotBF16, kSlotC64, kSlotC128, kSlots };
Slot dtype_slot(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kSlotF32;
    case at::kDouble: return kSlotF64;
    case at::kHalf: return kSlotF16;
    case at::kBFloat16: return kSlotBF16;
    case at::kComplexFloat: return kSlotC64;
    case at::kComplexDouble: return kSlotC128;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", t);
  }
}

// The step count of one param the kernels read: a float32 on the device (the user's step, or a
// float32 copy of it written back afterwards), or, for a host step, the value the host counted.
struct ParamStep {
  at::Tensor device;     // undefined: host step
  at::Tensor copy_back;  // the user's step, when `device` is a float32 copy of it
  double host = 0;
};

// What the kernels of one device need besides the plan.
struct DeviceWork {
  at::Device device;
  at::Tensor lr_on_device;  // keeps a moved or converted lr tensor alive until the launch
  LearningRate lr{};
};

// Where the kernels on `device` read the learning rate. A device lr tensor is read by the kernel
// (moved to `device`, or widened to float64, by stream-ordered copies); a host one is read here.
void set_learning_rate(DeviceWork& dw, double lr, const std::optional<at::Tensor>& lr_tensor) {
  dw.lr = LearningRate{nullptr, nullptr, lr, false};
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return;
  const at::Tensor& t = *lr_tensor;
  if (t.is_cpu()) {
    dw.lr.host_is_float = t.scalar_type() == at::kFloat;
    dw.lr.host = dw.lr.host_is_float ? t.item<float>() : t.item<double>();
    return;
  }
  at::Tensor d = t.device() == dw.device ? t : t.to(dw.device);
  if (d.scalar_type() != at::kFloat && d.scalar_type() != at::kDouble) d = d.to(at::kDouble);
  dw.lr_on_device = d;
  if (d.scalar_type() == at::kFloat) {
    dw.lr.device_float = d.const_data_ptr<float>();
  } else {
    dw.lr.device_double = d.const_data_ptr<double>();
  }
}

// torch's sparse path, unfused (coalesce, sum += g^2 on the rows present, p -= clr * g / std):
// it synchronizes, since coalesce needs the number of distinct indices on the host, and its
// Scalar learning rate needs the step and a device lr on the host.
void sparse_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& sum,
                   double neg_clr, double eps, bool maximize, bool eps_inside_sqrt) {
  // The update is non-linear in the gradient, so duplicate indices must be summed first.
  at::Tensor g = (maximize ? grad.neg() : grad).coalesce();
  const at::Tensor indices = g._indices();
  const at::Tensor values = g._values();
  auto make_sparse = [&](const at::Tensor& v) {
    return at::sparse_coo_tensor(indices, v, g.sizes());
  };
  sum.add_(make_sparse(values.pow(2)));
  at::Tensor std_values = sum.sparse_mask(g)._values();
  std_values = eps_inside_sqrt ? std_values.add_(eps).sqrt_() : std_values.sqrt_().add_(eps);
  param.add_(make_sparse(values / std_values), neg_clr);
}

void adagrad_step_cuda(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                       at::TensorList steps, double lr, double lr_decay, double weight_decay,
                       double eps, bool maximize, bool eps_inside_sqrt,
                       const std::optional<at::Tensor>& lr_tensor) {
  const StepOptions options{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  const StepPlan plan = plan_step(Variant::Elementwise, params, grads, sums, steps, weight_decay,
                                  lr_tensor);

  // Still nothing changed: the lr on each device and float32 copies of steps (allocations).
  std::vector<DeviceWork> devices;
  std::vector<ParamStep> step_of(params.size());
  for (size_t i : plan.stepping) {
    const at::Tensor& p = params[i];
    if (p.is_cpu()) continue;
    TORCH_CHECK(p.is_cuda(), "param ", i, ": the CUDA kernel cannot update a tensor on ", p.device());
    c10::cuda::CUDAGuard guard(p.device());
    if (std::none_of(devices.begin(), devices.end(),
                     [&](const DeviceWork& d) { return d.device == p.device(); })) {
      devices.push_back(DeviceWork{p.device()});
      set_learning_rate(devices.back(), lr, lr_tensor);
    }
    const at::Tensor& st = steps[i];
    if (st.is_cuda()) {
      // The kernel reads float32 steps; torch.optim keeps them in float32, others get a copy.
      step_of[i].device = st.scalar_type() == at::kFloat ? st : st.to(at::kFloat);
      if (!step_of[i].device.is_same(st)) step_of[i].copy_back = st;
    }
  }

  // The CPU params of the call (a group mixing CPU and CUDA params), by the CPU backend.
  cpu::run_plan(Variant::Elementwise, plan, params, steps, options);

  // Steps, then the update, on each device's current stream.
  for (DeviceWork& dw : devices) {
    c10::cuda::CUDAGuard guard(dw.device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dw.device.index()).stream();
    std::vector<float*> device_steps;
    for (size_t i : plan.stepping) {
      if (params[i].device() != dw.device) continue;
      ParamStep& s = step_of[i];
      if (s.device.defined()) {
        device_steps.push_back(s.device.data_ptr<float>());
      } else {
        s.host = increment_host_step(steps[i]);  // a CPU tensor: no device read
      }
    }
    increment_device_steps(device_steps, stream);

    std::vector<Entry> entries[kSlots];
    for (const DenseGroup& group : plan.dense) {
      if (group.device != dw.device) continue;
      for (const DenseParam& d : group.params) {
        const ParamStep& s = step_of[d.index];
        const StepRef step{s.device.defined() ? s.device.const_data_ptr<float>() : nullptr, s.host};
        entries[dtype_slot(group.dtype)].push_back(
            Entry{{d.param.data_ptr(), const_cast<void*>(d.grad.const_data_ptr()), d.sum.data_ptr()},
                  d.param.numel(),
                  step});
      }
    }
    Hyper hyper{dw.lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, true};
    launch_update<float>(entries[kSlotF32], hyper, stream);
    launch_update<double>(entries[kSlotF64], hyper, stream);
    launch_update<c10::Half>(entries[kSlotF16], hyper, stream);
    launch_update<c10::BFloat16>(entries[kSlotBF16], hyper, stream);
    hyper.fma_weight_decay = false;
    launch_update<float>(entries[kSlotC64], hyper, stream);
    launch_update<double>(entries[kSlotC128], hyper, stream);

    for (const SparseParam& sp : plan.sparse) {
      if (sp.param.device() != dw.device) continue;
      const ParamStep& s = step_of[sp.index];
      const double step = s.device.defined() ? s.device.item<double>() : s.host;
      const double clr = neg_clr(host_learning_rate(options), step, lr_decay);
      sparse_update(sp.param, sp.grad, sp.sum, clr, eps, maximize, eps_inside_sqrt);
    }
  }
  for (const ParamStep& s : step_of) {
    if (s.copy_back.defined()) s.copy_back.copy_(s.device);
  }
  plan.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adagrad, CUDA, m) { m.impl("adagrad_step_", &adagrad_step_cuda); }
// A sparse CUDA grad in the list makes the dispatcher pick this key; the same code handles it.
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCUDA, m) { m.impl("adagrad_step_", &adagrad_step_cuda); }

}  // namespace fused_adagrad::cuda
