// CUDA backend of fused_adagrad::embedding_bags_adagrad_step_: the Adagrad step of embedding
// tables straight from their bags' output grad, bitwise what the CPU backend
// (csrc/cpu/embedding_bags_cpu.cpp) computes. As there, a table's looked-up ids are the entries
// of a sparse update whose grad rows are their bags' rows of the output grad, scaled by the
// per_sample_weight or 1 / bag size; here the entries are sorted by row on the device, and, as
// in the sparse kernels of adagrad_cuda.cu and rowwise_cuda.cu, the worker (a warp element-wise,
// eight lanes row-wise) of the first sorted position of each row sums that row's entries in entry
// order and updates it, with the same correctly rounded operations as the CPU kernels
// (csrc/cpu/kernel_impl.h: for_each_distinct_row, sparse_update_element, rowwise_update_row).
// After the plan's checks, which read the batch's offsets and ids on the host once, no device
// value is read on the host.
#include "step_common.cuh"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fused_adagrad::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Device side

constexpr int kThreads = 256;
constexpr int kRowLanes = 8;  // the CPU row-wise kernel's lane count: it fixes the sum's order

struct BagsHyper {
  LearningRate lr;
  double lr_decay;
  double weight_decay;  // row-wise only (the plan refuses it element-wise)
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
};

// One table's launch. Sorted position j holds an entry (a non-padding id) of table row sorted[j],
// ties in entry order; padding ids sort last, as row `rows`, and are skipped. The entry's grad
// row starts at grad + bag[j] * grad_stride (grad_stride 0: a broadcast output grad) and, with a
// `scale`, is multiplied by scale[j] and rounded to S first.
template <typename S>
struct TableArgs {
  S* weight;
  void* sum;  // S per element (element-wise), the math type per row (row-wise)
  const S* grad;
  int64_t grad_stride;
  const int64_t* sorted;
  const int64_t* bag;
  const S* scale;
  int64_t entries, rows, dim;
  StepRef step;
};

// Element i of the grad row of sorted position k, as torch materializes it (scaled: rounded).
template <typename S, typename M>
__device__ __forceinline__ M entry_value(const TableArgs<S>& a, int64_t k, int64_t i) {
  const M g = static_cast<M>(a.grad[a.bag[k] * a.grad_stride + i]);
  return a.scale == nullptr ? g : round_to<S>(mul_rn(g, static_cast<M>(a.scale[k])));
}

// Element i of the sum of sorted positions [first, last), added in entry order: rounded to S
// after each add element-wise (torch's coalesce sums in the param's dtype), in the math type
// row-wise (as the CPU kernels sum).
template <typename S, typename M, bool kRoundEachAdd>
__device__ __forceinline__ M summed_grad(const TableArgs<S>& a, int64_t first, int64_t last,
                                         int64_t i) {
  return in_order_sum<kLoadsAhead, M>(
      first, last, [&](int64_t k) { return entry_value<S, M>(a, k, i); }, [](M acc, M v) {
        const M sum = add_rn(acc, v);
        if constexpr (kRoundEachAdd) return round_to<S>(sum);
        return sum;
      });
}

// Element-wise: the sparse step of sparse_adagrad_kernel (adagrad_cuda.cu) per element, a warp
// over the row: sum = sum + g*g (a rounded square, then a rounded add); std = sqrt(sum) + eps;
// p = p + (-clr) * (g / std), an FMA for float and double, a rounded product then the add for
// half and bfloat16.
template <typename S, typename M>
__device__ __forceinline__ void elementwise_row(const TableArgs<S>& a, int64_t first,
                                                int64_t last, const BagsHyper& h) {
  const int64_t row = a.sorted[first];
  const M neg_clr = round_to<S>(static_cast<M>(device_neg_clr(h.lr, step_value(a.step), h.lr_decay)));
  const M eps = round_to<S>(static_cast<M>(h.eps));
  S* p = a.weight + row * a.dim;
  S* s = static_cast<S*>(a.sum) + row * a.dim;
  for (int64_t i = threadIdx.x % 32; i < a.dim; i += 32) {
    M g = summed_grad<S, M, true>(a, first, last, i);
    if (h.maximize) g = -g;
    const M sv = round_to<S>(add_rn(static_cast<M>(s[i]), round_to<S>(mul_rn(g, g))));
    const M denom = h.eps_inside_sqrt ? round_to<S>(sqrt_rn(round_to<S>(add_rn(sv, eps))))
                                      : round_to<S>(add_rn(round_to<S>(sqrt_rn(sv)), eps));
    const M q = round_to<S>(div_rn(g, denom));
    M pv = static_cast<M>(p[i]);
    if constexpr (sizeof(S) == sizeof(M)) {
      pv = fma_(neg_clr, q, pv);
    } else {
      pv = add_rn(pv, round_to<S>(mul_rn(neg_clr, q)));
    }
    s[i] = static_cast<S>(sv);
    p[i] = static_cast<S>(pv);
  }
}

// Row-wise: update_row of rowwise_cuda.cu, eight lanes over the row. g = -grad if maximize,
// g = g + wd * p; the squares summed in lane e % 8, the lanes combined as
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); m = m + total / dim;
// std = sqrt(m) + eps, or sqrt(m + eps); p = p + (neg_clr / std) * g. The entries are summed
// again in the second pass rather than kept: a row may be long.
template <typename S, typename M>
__device__ __forceinline__ void rowwise_row(const TableArgs<S>& a, int64_t first, int64_t last,
                                            const BagsHyper& h) {
  const int64_t row = a.sorted[first], n = a.dim;
  S* p = a.weight + row * n;
  M* m = static_cast<M*>(a.sum) + row;
  const int lane = threadIdx.x % kRowLanes;
  const unsigned mask = 0xffu << (threadIdx.x % 32 / kRowLanes * kRowLanes);  // this lane group
  const M wd = static_cast<M>(h.weight_decay), eps = static_cast<M>(h.eps);
  const auto grad_at = [&](int64_t i) {
    M g = summed_grad<S, M, false>(a, first, last, i);
    if (h.maximize) g = -g;
    if (h.weight_decay != 0) g = add_rn(g, mul_rn(wd, static_cast<M>(p[i])));
    return g;
  };
  M acc = 0;
  for (int64_t i = lane; i < n; i += kRowLanes) {
    const M g = grad_at(i);
    acc = add_rn(acc, mul_rn(g, g));
  }
  for (int offset = 1; offset < kRowLanes; offset *= 2) {
    acc = add_rn(acc, __shfl_xor_sync(mask, acc, offset, kRowLanes));
  }
  M total = 0;
  if (lane == 0) {
    total = add_rn(*m, div_rn(acc, static_cast<M>(n)));
    *m = total;
  }
  total = __shfl_sync(mask, total, 0, kRowLanes);
  const M denom = h.eps_inside_sqrt ? sqrt_rn(add_rn(total, eps)) : add_rn(sqrt_rn(total), eps);
  const M scale = div_rn(static_cast<M>(device_neg_clr(h.lr, step_value(a.step), h.lr_decay)), denom);
  for (int64_t i = lane; i < n; i += kRowLanes) {
    const M g = grad_at(i);
    p[i] = static_cast<S>(add_rn(static_cast<M>(p[i]), mul_rn(scale, g)));
  }
}

// A worker per sorted position; the worker of a row's first position updates the row, the
// others return at once. Steps were counted by an earlier launch on the stream.
template <typename S, bool kRowWise>
__global__ void __launch_bounds__(kThreads) bags_step_kernel(const TableArgs<S> a,
                                                             const BagsHyper h) {
  using M = typename MathTypeOf<S>::type;
  constexpr int kLanes = kRowWise ? kRowLanes : 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * (kThreads / kLanes) + threadIdx.x / kLanes;
  if (j >= a.entries) return;
  const int64_t row = a.sorted[j];
  if (row >= a.rows || (j > 0 && a.sorted[j - 1] == row)) return;
  const unsigned group = kLanes == 32 ? 0xffffffffu : 0xffu << (threadIdx.x % 32 / kLanes * kLanes);
  const int64_t last = run_end(a.sorted, j, a.entries, threadIdx.x % kLanes, kLanes, group);
  if constexpr (kRowWise) {
    rowwise_row<S, M>(a, j, last, h);
  } else {
    elementwise_row<S, M>(a, j, last, h);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// One table's entries in the kernel's order, and its step, made before anything changes.
struct TableWork {
  at::Tensor sorted, bag, scale;  // undefined sorted: no ids
  ParamStep step;
};

// The number of non-padding ids in each bag (`offsets`: the table's, on the device), which
// nn.EmbeddingBag's mean divides by.
at::Tensor bag_sizes(const BagTable& table, const at::Tensor& offsets) {
  const int64_t batch = offsets.numel() - 1;
  at::Tensor before = offsets;  // non-padding ids before each offset
  if (table.padding_idx >= 0) {
    const at::Tensor kept = table.indices.ne(table.padding_idx).to(at::kLong).cumsum(0);
    before = at::cat({at::zeros({1}, kept.options()), kept}).index_select(0, offsets);
  }
  return before.narrow(0, 1, batch) - before.narrow(0, 0, batch);
}

TableWork table_work(const BagTable& table, const at::Tensor& weight, const at::Tensor& offsets,
                     int64_t mode) {
  TableWork w;
  if (table.indices.numel() == 0) return w;
  at::Tensor keys = table.indices;  // a view of the caller's ids: never written
  if (table.padding_idx >= 0) keys = keys.masked_fill(keys.eq(table.padding_idx), weight.size(0));
  auto [sorted, entry] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  w.sorted = sorted.contiguous();
  // The bag of entry e: the last one starting at or before e.
  w.bag = at::searchsorted(offsets, entry, /*out_int32=*/false, /*right=*/true).sub_(1);
  if (mode == 1) {
    // torch's mean backward: grad * (1 / bag_size), the reciprocal in the table's dtype.
    const at::Tensor inverse = 1 / bag_sizes(table, offsets).to(weight.scalar_type());
    w.scale = inverse.index_select(0, w.bag);
  } else if (table.per_sample_weights.defined()) {
    w.scale = table.per_sample_weights.index_select(0, entry);
  }
  return w;
}

template <typename S>
void launch_table(const TableWork& w, const BagTable& table, const at::Tensor& weight,
                  const at::Tensor& sum, const at::Tensor& grad, bool rowwise,
                  const BagsHyper& h, cudaStream_t stream) {
  const TableArgs<S> a{static_cast<S*>(weight.data_ptr()), sum.data_ptr(),
                       static_cast<const S*>(grad.const_data_ptr()) + table.column, grad.stride(0),
                       w.sorted.const_data_ptr<int64_t>(), w.bag.const_data_ptr<int64_t>(),
                       w.scale.defined() ? static_cast<const S*>(w.scale.const_data_ptr()) : nullptr,
                       w.sorted.numel(), weight.size(0), weight.size(1), step_ref(w.step)};
  const int64_t workers = kThreads / (rowwise ? kRowLanes : 32);
  const auto blocks = static_cast<unsigned>((a.entries + workers - 1) / workers);
  if (rowwise) {
    bags_step_kernel<S, true><<<blocks, kThreads, 0, stream>>>(a, h);
  } else {
    bags_step_kernel<S, false><<<blocks, kThreads, 0, stream>>>(a, h);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using BagsStepFn = void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        int64_t, c10::IntArrayRef, bool, bool, double, double, double, double, bool,
                        bool, const std::optional<at::Tensor>&);

void embedding_bags_step_cuda(at::TensorList weights, at::TensorList sums, at::TensorList steps,
                              const at::Tensor& grad_output, const at::Tensor& indices,
                              const at::Tensor& offsets,
                              const std::optional<at::Tensor>& per_sample_weights, int64_t mode,
                              c10::IntArrayRef padding_idx, bool include_last_offset, bool rowwise,
                              double lr, double lr_decay, double weight_decay, double eps,
                              bool maximize, bool eps_inside_sqrt,
                              const std::optional<at::Tensor>& lr_tensor) {
  if (!weights.empty() && weights[0].defined() && weights[0].is_cpu()) {
    // CPU tables reach here when the lr tensor is the call's only CUDA tensor (any other would
    // be refused by the checks): the CPU backend's, which validates the call itself.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fused_adagrad::embedding_bags_adagrad_step_", "")
                               .typed<BagsStepFn>();
    return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), weights, sums, steps,
                         grad_output, indices, offsets, per_sample_weights, mode, padding_idx,
                         include_last_offset, rowwise, lr, lr_decay, weight_decay, eps, maximize,
                         eps_inside_sqrt, lr_tensor);
  }
  const Variant variant = rowwise ? Variant::RowWise : Variant::Elementwise;
  const StepOptions o{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  const BagsArgs args{weights, indices, offsets, per_sample_weights, mode, padding_idx,
                      include_last_offset};
  const BagsPlan plan = plan_bags(args, true);
  check_bags_step(variant, args, plan, sums, steps, grad_output, o);
  const at::Device device = weights[0].device();
  TORCH_CHECK(device.is_cuda(), "embedding bags: the CUDA kernel cannot update tables on ", device);

  // What the launches read, made while nothing has changed yet.
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  DeviceWork dw{device};
  set_learning_rate(dw, lr, lr_tensor);
  // The kernels read rows of unit stride; a broadcast grad (row stride 0) is taken as it is.
  const at::Tensor grad = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const int64_t tables = static_cast<int64_t>(weights.size());
  std::vector<int64_t> host_offsets;  // every table's batch + 1 offsets, uploaded at once
  for (const BagTable& table : plan.tables) {
    host_offsets.insert(host_offsets.end(), table.offsets.begin(), table.offsets.end());
  }
  // From pinned memory, asynchronously: a copy from pageable memory waits for the stream.
  at::Tensor pinned_offsets = at::empty({static_cast<int64_t>(host_offsets.size())},
                                        at::TensorOptions(at::kLong).pinned_memory(true));
  std::copy(host_offsets.begin(), host_offsets.end(), pinned_offsets.data_ptr<int64_t>());
  const at::Tensor all_offsets = pinned_offsets.to(device, /*non_blocking=*/true);
  std::vector<TableWork> work;
  work.reserve(tables);
  for (int64_t t = 0; t < tables; ++t) {
    const at::Tensor table_offsets = all_offsets.narrow(0, t * (plan.batch + 1), plan.batch + 1);
    work.push_back(table_work(plan.tables[t], weights[t], table_offsets, mode));
    const at::Tensor& st = steps[t];
    if (st.is_cuda()) {
      // The kernels read float32 steps; torch.optim keeps them in float32, others get a copy.
      ParamStep& s = work.back().step;
      s.device = st.scalar_type() == at::kFloat ? st : st.to(at::kFloat);
      if (!s.device.is_same(st)) s.copy_back = st;
    }
  }

  // Nothing below can fail (but a launch). Every table steps, touched or not, as each would with
  // an (empty) sparse grad of its own.
  std::vector<float*> device_steps;
  for (int64_t t = 0; t < tables; ++t) {
    ParamStep& s = work[t].step;
    if (s.device.defined()) {
      device_steps.push_back(s.device.data_ptr<float>());
    } else {
      s.host = increment_host_step(steps[t]);
    }
  }
  increment_device_steps(device_steps, nullptr, stream);
  const BagsHyper h{dw.lr, lr_decay, rowwise ? weight_decay : 0.0, eps, maximize, eps_inside_sqrt};
  for (int64_t t = 0; t < tables; ++t) {
    const TableWork& w = work[t];
    if (!w.sorted.defined()) continue;
    const BagTable& table = plan.tables[t];
    switch (weights[t].scalar_type()) {
      case at::kFloat: launch_table<float>(w, table, weights[t], sums[t], grad, rowwise, h, stream); break;
      case at::kDouble: launch_table<double>(w, table, weights[t], sums[t], grad, rowwise, h, stream); break;
      case at::kHalf: launch_table<c10::Half>(w, table, weights[t], sums[t], grad, rowwise, h, stream); break;
      case at::kBFloat16:
        launch_table<c10::BFloat16>(w, table, weights[t], sums[t], grad, rowwise, h, stream);
        break;
      default: TORCH_INTERNAL_ASSERT(false, "embedding bags of ", weights[t].scalar_type());
    }
  }
  for (const TableWork& w : work) {
    if (w.step.copy_back.defined()) w.step.copy_back.copy_(w.step.device);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adagrad, CUDA, m) {
  m.impl("embedding_bags_adagrad_step_", &embedding_bags_step_cuda);
}

}  // namespace fused_adagrad::cuda
