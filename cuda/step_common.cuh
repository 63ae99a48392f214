// What the CUDA kernels (adagrad_cuda.cu: element-wise; rowwise_cuda.cu: row-wise) share: where
// a kernel reads the step count and the learning rate, correctly rounded arithmetic that nvcc may
// not contract, the launch that counts device steps, and run_plans, which takes a call from the
// plan (csrc/plan.h) to the kernels without reading any device value on the host.
#pragma once

#include "../csrc/cpu/backend.h"
#include "../csrc/plan.h"
#include "multi_tensor_apply.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

// torch.amp.GradScaler's tensors (GradScaling) on the launching device, read by the kernels:
// a nonzero found_inf makes every kernel of the step return at once; grads are divided by
// grad_scale and written back. Null: not given.
struct AmpScale {
  const float* grad_scale;
  const float* found_inf;
};

template <int N>
struct StepList {
  float* step[N];
  int count;
  const float* found_inf;  // nonzero: no step is counted
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

// Correctly rounded operations, by type: what the CPU kernels compute with -ffp-contract=off.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return __dsqrt_rn(x); }

__device__ __forceinline__ bool step_skipped(const AmpScale& amp) {
  return amp.found_inf != nullptr && *amp.found_inf != 0.0f;
}

// The unscaled grad g / grad_scale, rounded to the storage type S (which it is written back
// as, and which the CPU kernels then read); g itself without a grad_scale.
template <typename S, typename M>
__device__ __forceinline__ M unscaled(M g, const AmpScale& amp) {
  return amp.grad_scale == nullptr ? g : round_to<S>(div_rn(g, static_cast<M>(*amp.grad_scale)));
}

__device__ __forceinline__ double step_value(const StepRef& step) {
  return step.device != nullptr ? static_cast<double>(*step.device) : step.host;
}

// Where the run of sorted[j]'s value that starts at j ends (sorted ascending, n entries): the
// `width` lanes of a group (`mask`: theirs; `lane`: this one's index in it) test `width`
// positions at a time, since a hot table row's run can be tens of thousands of entries long.
__device__ __forceinline__ int64_t run_end(const int64_t* sorted, int64_t j, int64_t n, int lane,
                                           int width, unsigned mask) {
  const int64_t value = sorted[j];
  const int shift = static_cast<int>(threadIdx.x % 32) / width * width;
  for (int64_t base = j + 1;; base += width) {
    const int64_t k = base + lane;
    const unsigned differs = __ballot_sync(mask, k >= n || sorted[k] != value) >> shift;
    const unsigned ours = width == 32 ? differs : differs & ((1u << width) - 1);
    if (ours != 0) return base + __ffs(static_cast<int>(ours)) - 1;
  }
}

// load(first), then add(acc, load(k)) for k = first + 1 .. last - 1, in that order. The adds
// form one chain, the loads do not: issuing kAhead of them before their adds keeps as many in
// flight, where one at a time would wait a memory latency per entry of a long run.
template <int kAhead, typename M, typename Load, typename Add>
__device__ __forceinline__ M in_order_sum(int64_t first, int64_t last, Load load, Add add) {
  M acc = load(first);
  int64_t k = first + 1;
  for (; k + kAhead <= last; k += kAhead) {
    M v[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) v[u] = load(k + u);
#pragma unroll
    for (int u = 0; u < kAhead; ++u) acc = add(acc, v[u]);
  }
  for (; k < last; ++k) acc = add(acc, load(k));
  return acc;
}
constexpr int kLoadsAhead = 8;

template <int N>
__global__ void increment_steps_kernel(const StepList<N> list) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < list.count && (list.found_inf == nullptr || *list.found_inf == 0.0f)) {
    *list.step[i] += 1.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// Whether launches on `stream` may take a 32 KB argument: built for it (CUDA >= 12.1, Volta+),
// a driver that supports it, and the stream not being captured into a graph. ATen's
// multi_tensor_apply also keeps to 4 KB arguments under capture; a graph replays the extra
// launches of the small tables cheaply.
// The runtime that launches (it may be older than the toolkit's headers) and the driver.
bool runtime_takes_large_args() {
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
  static const bool versions_ok = [] {
    int runtime = 0, driver = 0;
    C10_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    C10_CUDA_CHECK(cudaDriverGetVersion(&driver));
    return runtime >= 12010 && driver >= 12010;
  }();
  return versions_ok;
#else
  return false;
#endif
}

#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
bool large_kernel_args(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return runtime_takes_large_args() && capture == cudaStreamCaptureStatusNone;
}
#endif

template <typename List>
void launch_increments(const std::vector<float*>& steps, const float* found_inf,
                       cudaStream_t stream) {
  constexpr int kMax = static_cast<int>(sizeof(List::step) / sizeof(float*));
  constexpr int kThreads = 256;
  List list;
  list.found_inf = found_inf;
  for (size_t begin = 0; begin < steps.size(); begin += kMax) {
    list.count = static_cast<int>(std::min<size_t>(kMax, steps.size() - begin));
    std::copy_n(steps.begin() + begin, list.count, list.step);
    increment_steps_kernel<<<(list.count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(list);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void increment_device_steps(const std::vector<float*>& steps, const float* found_inf,
                            cudaStream_t stream) {
  if (steps.empty()) return;
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
  if (large_kernel_args(stream)) return launch_increments<LargeStepList>(steps, found_inf, stream);
#endif
  launch_increments<SmallStepList>(steps, found_inf, stream);
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
  at::Tensor grad_scale_on_device, found_inf_on_device;  // the same for the scaling tensors
  AmpScale amp{};
};

// The scaling tensors on `device` (stream-ordered copies of those on another device; under
// capture the plan has made sure they are already on the device).
void set_scaling(DeviceWork& dw, const GradScaling& scaling) {
  const auto on_device = [&](const std::optional<at::Tensor>& t, at::Tensor& keep) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    keep = t->device() == dw.device ? *t : t->to(dw.device);
    return keep.const_data_ptr<float>();
  };
  dw.amp.grad_scale = on_device(scaling.grad_scale, dw.grad_scale_on_device);
  dw.amp.found_inf = on_device(scaling.found_inf, dw.found_inf_on_device);
}

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

StepRef step_ref(const ParamStep& s) {
  return {s.device.defined() ? s.device.const_data_ptr<float>() : nullptr, s.host};
}

// A sparse COO grad's value rows in order of the table row they update, ties in grad order:
// sorted[j] is the table row of value row perm[j]. Duplicates of a row are then neighbours, so
// a kernel finds each distinct row (where sorted[j] != sorted[j - 1]) without a host round trip.
struct SortedRows {
  at::Tensor sorted, perm;
};

SortedRows sort_rows(const SparseParam& sp) {
  const at::Tensor indices = sp.grad._indices();
  at::Tensor rows = indices.select(0, 0).to(at::kLong);
  for (int64_t d = 1; d < sp.grad.sparse_dim(); ++d) {
    rows = rows * sp.grad.size(d) + indices.select(0, d);
  }
  auto [sorted, perm] = at::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {sorted.contiguous(), perm.contiguous()};
}

// Everything a device's launches read: the group's plan (its options too), the lr on that
// device, and by the plan's param index (steps) and plan.sparse index (rows).
struct DeviceStep {
  const StepPlan& plan;
  const DeviceWork& device;
  cudaStream_t stream;
  const std::vector<ParamStep>& step_of;
  const std::vector<SortedRows>& sorted_rows;
};

// What one group's launches need besides its plan, made while nothing has changed yet.
struct GroupWork {
  std::vector<DeviceWork> devices;
  std::vector<ParamStep> step_of;
  std::vector<SortedRows> sorted_rows;
};

// The lr on each device, float32 copies of steps and sorted sparse rows (params, steps: the
// group's slices of the op's lists).
GroupWork prepare_group(const StepPlan& plan, at::TensorList params, at::TensorList steps) {
  GroupWork w;
  w.step_of.resize(params.size());
  for (size_t i : plan.stepping) {
    const at::Tensor& p = params[i];
    if (p.is_cpu()) continue;
    TORCH_CHECK(p.is_cuda(), "param ", i, ": the CUDA kernel cannot update a tensor on ", p.device());
    c10::cuda::CUDAGuard guard(p.device());
    if (std::none_of(w.devices.begin(), w.devices.end(),
                     [&](const DeviceWork& d) { return d.device == p.device(); })) {
      w.devices.push_back(DeviceWork{p.device()});
      set_learning_rate(w.devices.back(), plan.options.lr, plan.options.lr_tensor);
      set_scaling(w.devices.back(), plan.scaling);
    }
    const at::Tensor& st = steps[i];
    if (st.is_cuda()) {
      // The kernels read float32 steps; torch.optim keeps them in float32, others get a copy.
      w.step_of[i].device = st.scalar_type() == at::kFloat ? st : st.to(at::kFloat);
      if (!w.step_of[i].device.is_same(st)) w.step_of[i].copy_back = st;
    }
  }
  w.sorted_rows.resize(plan.sparse.size());
  for (size_t k = 0; k < plan.sparse.size(); ++k) {
    if (!plan.sparse[k].param.is_cuda()) continue;
    c10::cuda::CUDAGuard guard(plan.sparse[k].param.device());
    w.sorted_rows[k] = sort_rows(plan.sparse[k]);
  }
  return w;
}

// Runs the planned groups of one op call: first, for every group, what can still fail
// (prepare_group); then per group its CPU params (a group mixing CPU and CUDA params) by the CPU
// backend and, per device, the step increments and `launch(const DeviceStep&)` on its current
// stream. No device value is read on the host, but for found_inf when a CUDA param keeps its step
// on the host (the host must then know whether to count it: one synchronization).
template <typename Launch>
void run_plans(Variant variant, const std::vector<StepPlan>& plans, at::TensorList all_params,
               at::TensorList all_steps, Launch launch) {
  std::vector<GroupWork> work;
  work.reserve(plans.size());
  for (const StepPlan& plan : plans) {
    work.push_back(prepare_group(plan, all_params.slice(plan.begin, plan.count),
                                 all_steps.slice(plan.begin, plan.count)));
  }
  for (size_t g = 0; g < plans.size(); ++g) {
    const StepPlan& plan = plans[g];
    GroupWork& w = work[g];
    const at::TensorList params = all_params.slice(plan.begin, plan.count);
    const at::TensorList steps = all_steps.slice(plan.begin, plan.count);
    cpu::run_plan(variant, plan, all_params, all_steps);
    std::optional<bool> skipped_on_host;  // found_inf as the host read it, when it had to
    for (const DeviceWork& dw : w.devices) {
      c10::cuda::CUDAGuard guard(dw.device);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dw.device.index()).stream();
      std::vector<float*> device_steps;
      for (size_t i : plan.stepping) {
        if (params[i].device() != dw.device) continue;
        ParamStep& s = w.step_of[i];
        if (s.device.defined()) {
          device_steps.push_back(s.device.data_ptr<float>());
        } else if (plan.scaling.may_skip() &&
                   (skipped_on_host ? *skipped_on_host
                                    : *(skipped_on_host = host_found_inf(plan.scaling)))) {
          s.host = steps[i].item<double>();  // not counted; the kernels return at once anyway
        } else {
          s.host = increment_host_step(steps[i]);  // a CPU tensor: no device read
        }
      }
      increment_device_steps(device_steps, dw.amp.found_inf, stream);
      launch(DeviceStep{plan, dw, stream, w.step_of, w.sorted_rows});
    }
  }
  for (size_t g = 0; g < plans.size(); ++g) {
    for (const ParamStep& s : work[g].step_of) {
      if (s.copy_back.defined()) s.copy_back.copy_(s.device);
    }
    plans[g].write_back();
  }
}

}  // namespace

// The launches of each variant over validated plans (adagrad_cuda.cu, rowwise_cuda.cu), so that
// the op over several groups, registered once, reaches both.
void run_elementwise_plans(const std::vector<StepPlan>& plans, at::TensorList params,
                           at::TensorList steps);
void run_rowwise_plans(const std::vector<StepPlan>& plans, at::TensorList params,
                       at::TensorList steps);

}  // namespace fused_adagrad::cuda
