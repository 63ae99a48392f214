// CUDA backend of fused_adagrad::rowwise_adagrad_step_ (row-wise Adagrad, one accumulator per
// row of dim 0). Eight threads per row, the same eight interleaved lanes and the same pairwise
// combination as the CPU kernel (csrc/cpu/kernel_impl.h, rowwise_update_row), every operation
// correctly rounded: the result is bitwise the CPU's. One launch per param (dense grads) and
// per sparse grad, after the shared launch that counts device steps; no device value is read on
// the host (the sparse indices' range check aside, done by the plan).
#include "step_common.cuh"

#include <torch/library.h>

namespace fused_adagrad::cuda {

namespace {

constexpr int kRowLanes = 8;  // the CPU kernel's lane count: it fixes the order of the row sums
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / kRowLanes;

struct RowHyper {
  LearningRate lr;
  double lr_decay;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
  AmpScale amp;
};

// One param's launch. Dense grads: `grad` holds rows of row_len, and rows [0, rows) are updated.
// Sparse grads: `grad` holds the value rows; `sorted`/`perm` order them by table row
// (step_common.cuh's SortedRows) and `rows` is their count (nnz).
template <typename S, typename M>
struct RowArgs {
  S* param;
  S* grad;  // unscaled in place with a grad_scale
  M* sum;
  const int64_t* sorted;
  const int64_t* perm;
  int64_t rows;
  int64_t row_len;
  StepRef step;
};

// The eight threads of a row, within their warp.
__device__ __forceinline__ unsigned lane_group_mask() {
  return 0xffu << (threadIdx.x % 32 / kRowLanes * kRowLanes);
}

// g of element e of the row: maximize and weight decay applied, in the math type.
template <typename S, typename M>
__device__ __forceinline__ M row_grad(M g, const S* p, int64_t e, const RowHyper& h, M wd) {
  if (h.maximize) g = -g;
  if (h.weight_decay != 0) g = add_rn(g, mul_rn(wd, static_cast<M>(p[e])));
  return g;
}

// Updates one row from its grad, `grad_at(e, first)` (the math-type grad of element e,
// duplicates already summed; `first` on the first of its two reads, which unscales and writes
// the unscaled grad back: each element is read by the same thread both times). Every thread of
// the lane group calls it for the same row.
template <typename S, typename M, typename GradAt>
__device__ __forceinline__ void update_row(S* p, M* m, int64_t n, M neg_clr, const RowHyper& h,
                                           GradAt grad_at) {
  const int lane = threadIdx.x % kRowLanes;
  const unsigned mask = lane_group_mask();
  const M wd = static_cast<M>(h.weight_decay), eps = static_cast<M>(h.eps);
  M acc = 0;
  for (int64_t e = lane; e < n; e += kRowLanes) {
    const M g = row_grad(grad_at(e, true), p, e, h, wd);
    acc = add_rn(acc, mul_rn(g, g));
  }
  // ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), as the CPU combines its lanes.
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
  const M scale = div_rn(neg_clr, denom);
  for (int64_t e = lane; e < n; e += kRowLanes) {
    const M g = row_grad(grad_at(e, false), p, e, h, wd);
    p[e] = static_cast<S>(add_rn(static_cast<M>(p[e]), mul_rn(scale, g)));
  }
}

// Element e of a grad row: unscaled and written back on the first read, as read later.
template <typename S, typename M>
__device__ __forceinline__ M grad_element(S* g, int64_t e, bool first, const AmpScale& amp) {
  if (!first || amp.grad_scale == nullptr) return static_cast<M>(g[e]);
  const M u = unscaled<S>(static_cast<M>(g[e]), amp);
  g[e] = static_cast<S>(u);
  return u;
}

template <typename S, typename M>
__device__ __forceinline__ M row_neg_clr(const RowArgs<S, M>& a, const RowHyper& h) {
  return static_cast<M>(device_neg_clr(h.lr, step_value(a.step), h.lr_decay));
}

template <typename S, typename M>
__global__ void __launch_bounds__(kRowThreads) rowwise_dense_kernel(const RowArgs<S, M> a,
                                                                    const RowHyper h) {
  if (step_skipped(h.amp)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const M neg_clr = row_neg_clr(a, h);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowLanes;
       r < a.rows; r += stride) {
    S* g = a.grad + r * a.row_len;
    update_row(a.param + r * a.row_len, a.sum + r, a.row_len, neg_clr, h,
               [&](int64_t e, bool first) { return grad_element<S, M>(g, e, first, h.amp); });
  }
}

// A lane group per value row; the group of a table row's first value row sums its duplicates
// in grad order (in the math type, as the CPU does) and updates the row.
template <typename S, typename M>
__global__ void __launch_bounds__(kRowThreads) rowwise_sparse_kernel(const RowArgs<S, M> a,
                                                                     const RowHyper h) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowLanes;
  if (j >= a.rows || step_skipped(h.amp)) return;
  const int64_t row = a.sorted[j];
  if (j > 0 && a.sorted[j - 1] == row) return;
  const int64_t last = run_end(a.sorted, j, a.rows, threadIdx.x % kRowLanes, kRowLanes,
                               lane_group_mask());
  const int64_t n = a.row_len;
  update_row(a.param + row * n, a.sum + row, n, row_neg_clr(a, h), h, [&](int64_t e, bool first) {
    return in_order_sum<kLoadsAhead, M>(
        j, last, [&](int64_t k) { return grad_element<S, M>(a.grad + a.perm[k] * n, e, first, h.amp); },
        [](M acc, M v) { return add_rn(acc, v); });
  });
}

template <typename S>
void launch_rowwise(at::Tensor param, const at::Tensor& grad, at::Tensor sum, int64_t row_len,
                    const SortedRows* sorted, const StepRef& step, const RowHyper& h,
                    cudaStream_t stream) {
  using M = typename MathTypeOf<S>::type;
  const int64_t rows = sorted != nullptr ? grad.size(0) : param.numel() / row_len;
  const RowArgs<S, M> args{static_cast<S*>(param.data_ptr()), static_cast<S*>(grad.data_ptr()),
                           static_cast<M*>(sum.data_ptr()),
                           sorted != nullptr ? sorted->sorted.const_data_ptr<int64_t>() : nullptr,
                           sorted != nullptr ? sorted->perm.const_data_ptr<int64_t>() : nullptr,
                           rows, row_len, step};
  if (sorted != nullptr) {
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    rowwise_sparse_kernel<S, M><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(args, h);
  } else {
    const int64_t blocks = std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, 1 << 20);
    rowwise_dense_kernel<S, M><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(args, h);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_rowwise_any(at::ScalarType dtype, const at::Tensor& param, const at::Tensor& grad,
                        const at::Tensor& sum, int64_t row_len, const SortedRows* sorted,
                        const StepRef& step, const RowHyper& h, cudaStream_t stream) {
  switch (dtype) {
    case at::kFloat: return launch_rowwise<float>(param, grad, sum, row_len, sorted, step, h, stream);
    case at::kDouble: return launch_rowwise<double>(param, grad, sum, row_len, sorted, step, h, stream);
    case at::kHalf: return launch_rowwise<c10::Half>(param, grad, sum, row_len, sorted, step, h, stream);
    case at::kBFloat16:
      return launch_rowwise<c10::BFloat16>(param, grad, sum, row_len, sorted, step, h, stream);
    default: TORCH_INTERNAL_ASSERT(false, "row-wise Adagrad on ", dtype);
  }
}

// The row-wise launches of one group on one device.
void launch_group(const DeviceStep& d) {
  const StepOptions& o = d.plan.options;
  const RowHyper h{d.device.lr, o.lr_decay, o.weight_decay, o.eps, o.maximize, o.eps_inside_sqrt,
                   d.device.amp};
  for (const DenseGroup& group : d.plan.dense) {
    if (group.device != d.device.device) continue;
    for (const DenseParam& w : group.params) {
      launch_rowwise_any(group.dtype, w.param, w.grad, w.sum, w.row_len, nullptr,
                         step_ref(d.step_of[w.index]), h, d.stream);
    }
  }
  for (size_t k = 0; k < d.plan.sparse.size(); ++k) {
    const SparseParam& sp = d.plan.sparse[k];
    if (sp.param.device() != d.device.device) continue;
    launch_rowwise_any(sp.param.scalar_type(), sp.param, sp.values, sp.sum, sp.row_len,
                       &d.sorted_rows[k], step_ref(d.step_of[sp.index]), h, d.stream);
  }
}

void rowwise_adagrad_step_cuda(at::TensorList params, const OptionalTensorList& grads,
                               at::TensorList sums, at::TensorList steps, double lr,
                               double lr_decay, double weight_decay, double eps, bool maximize,
                               bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  const StepOptions o{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  run_rowwise_plans({plan_step(Variant::RowWise, params, grads.vec(), sums, steps, o)}, params,
                    steps);
}

}  // namespace

void run_rowwise_plans(const std::vector<StepPlan>& plans, at::TensorList params,
                       at::TensorList steps) {
  run_plans(Variant::RowWise, plans, params, steps, &launch_group);
}

TORCH_LIBRARY_IMPL(fused_adagrad, CUDA, m) {
  m.impl("rowwise_adagrad_step_", &rowwise_adagrad_step_cuda);
}
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCUDA, m) {
  m.impl("rowwise_adagrad_step_", &rowwise_adagrad_step_cuda);
}

}  // namespace fused_adagrad::cuda
