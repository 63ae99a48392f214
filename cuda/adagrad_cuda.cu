// CUDA backend of fused_adagrad::adagrad_step_ (element-wise Adagrad). Per device: one launch
// increments every device-resident step, then one multi-tensor launch per dtype (more when the
// tensors do not fit one argument table) updates param and sum in a single pass over param,
// grad and sum, and one launch per sparse grad updates its distinct rows. No device value is
// read on the host (the sparse indices' range check aside, done by the plan), so a dense step
// can be captured in a CUDA graph.
#include "step_common.cuh"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/library.h>

namespace fused_adagrad::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Device side

struct Hyper {
  LearningRate lr;
  double lr_decay;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
  bool fma_weight_decay;  // false for the real views of complex params
  AmpScale amp;
};

// The 4 KB table fits every GPU; the 32 KB one moves ~8x more work per launch.
using SmallTable = ChunkTable<3, StepRef, 32, 384>;
using LargeTable = ChunkTable<3, StepRef, 256, 3328>;
static_assert(sizeof(SmallTable) + sizeof(Hyper) <= kSmallArgBytes, "kernel argument too large");
static_assert(sizeof(LargeTable) + sizeof(Hyper) <= kLargeArgBytes, "kernel argument too large");

template <typename M>
struct Coeffs {
  M neg_clr;
  M weight_decay;  // in the math type: torch's CUDA add(alpha=) keeps alpha in opmath (float)
  M eps;           // rounded to the storage type, as torch casts a scalar operand
  bool weight_decay_on;
  bool fma_weight_decay;
  bool maximize;
  bool eps_inside_sqrt;
  AmpScale amp;
};

// The element update in csrc/cpu/kernel_impl.h's order (with torch's CUDA rounding of the weight
// decay for half and bfloat16, see adagrad_kernel): g = -grad if maximize; g += wd * p
// (FMA; a rounded product then a sum for complex params; skipped entirely at wd == 0, as torch
// skips it); sum += g * g (FMA); std = sqrt(sum) + eps, or sqrt(sum + eps);
// p = p + (neg_clr * g) / std. For half and bfloat16 the intermediates are rounded where torch
// stores them; the arithmetic between the roundings is float. With a grad_scale, the grad is
// unscaled first and written back.
template <typename S, typename M>
__device__ __forceinline__ void update(S& param, S& grad, S& sum, const Coeffs<M>& c) {
  M g = unscaled<S>(static_cast<M>(grad), c.amp);
  if (c.amp.grad_scale != nullptr) grad = static_cast<S>(g);
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
__device__ __forceinline__ void update_packs(S* param, S* grad, S* sum, int count,
                                             const Coeffs<M>& c) {
  using P = Pack<S, W>;
  P* p = reinterpret_cast<P*>(param);
  P* g = reinterpret_cast<P*>(grad);
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
        if (c.amp.grad_scale != nullptr) g[i] = rg[u];
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
  if (step_skipped(h.amp)) return;
  const int t = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunkSize;
  const int n = static_cast<int>(min(kChunkSize, table.numel[t] - start));
  S* param = static_cast<S*>(table.ptr[0][t]) + start;
  S* grad = static_cast<S*>(table.ptr[1][t]) + start;
  S* sum = static_cast<S*>(table.ptr[2][t]) + start;

  const StepRef step = table.extra[t];
  const double step_value = step.device != nullptr ? static_cast<double>(*step.device) : step.host;
  Coeffs<M> c;
  c.neg_clr = static_cast<M>(device_neg_clr(h.lr, step_value, h.lr_decay));
  // Not rounded to half/bfloat16, unlike on the CPU: torch's CUDA `grad.add(param, alpha=wd)` is
  // fma(p, float(wd), g) (its CPU path rounds wd to the dtype first). So CPU and CUDA results
  // of half/bfloat16 params with weight decay differ, each matching torch on its device.
  c.weight_decay = static_cast<M>(h.weight_decay);
  c.eps = round_to<S>(static_cast<M>(h.eps));
  c.weight_decay_on = h.weight_decay != 0;
  c.fma_weight_decay = h.fma_weight_decay;
  c.maximize = h.maximize;
  c.eps_inside_sqrt = h.eps_inside_sqrt;
  c.amp = h.amp;

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

// ---------------------------------------------------------------------------------------------
// Host side

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

// ---------------------------------------------------------------------------------------------
// Sparse grads

// One sparse grad's launch: the table (param, sum: row_len elements per row), the grad's value
// rows, and their order by table row (step_common.cuh's SortedRows).
template <typename S>
struct SparseArgs {
  S* param;
  S* sum;
  S* values;  // unscaled in place with a grad_scale
  const int64_t* sorted;
  const int64_t* perm;
  int64_t nnz;
  int64_t row_len;
  StepRef step;
};

constexpr int kSparseThreads = 256;
constexpr int kSparseWarps = kSparseThreads / 32;

// torch's sparse arithmetic, as the CPU kernel computes it (csrc/cpu/kernel_impl.h,
// sparse_update_element): duplicates summed in grad order in the param's dtype; then per element
// sum = sum + g*g (a rounded square, then a rounded add); std = sqrt(sum) + eps;
// p = p + (-clr) * (g / std), an FMA for float and double (torch's BLAS axpy), a product rounded
// to the dtype and then the add for half and bfloat16. One warp per value row: the warp of the
// first value row of each table row updates that row, the others return at once.
template <typename S>
__global__ void __launch_bounds__(kSparseThreads) sparse_adagrad_kernel(const SparseArgs<S> a,
                                                                        const Hyper h) {
  using M = typename MathTypeOf<S>::type;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSparseWarps + threadIdx.x / 32;
  if (j >= a.nnz || step_skipped(h.amp)) return;
  const int64_t row = a.sorted[j];
  if (j > 0 && a.sorted[j - 1] == row) return;
  const int64_t last = run_end(a.sorted, j, a.nnz, threadIdx.x % 32, 32, 0xffffffffu);

  const M neg_clr = round_to<S>(static_cast<M>(device_neg_clr(h.lr, step_value(a.step), h.lr_decay)));
  const M eps = round_to<S>(static_cast<M>(h.eps));
  S* p = a.param + row * a.row_len;
  S* s = a.sum + row * a.row_len;
  // This warp alone reads the value rows j .. last - 1, so it alone writes them back unscaled.
  const auto value = [&](int64_t k, int64_t e) {
    S& v = a.values[a.perm[k] * a.row_len + e];
    const M u = unscaled<S>(static_cast<M>(v), h.amp);
    if (h.amp.grad_scale != nullptr) v = static_cast<S>(u);
    return u;
  };
  for (int64_t e = threadIdx.x % 32; e < a.row_len; e += 32) {
    M g = in_order_sum<kLoadsAhead, M>(j, last, [&](int64_t k) { return value(k, e); },
                                       [](M acc, M v) { return round_to<S>(add_rn(acc, v)); });
    if (h.maximize) g = -g;
    const M sv = round_to<S>(add_rn(static_cast<M>(s[e]), round_to<S>(mul_rn(g, g))));
    const M denom = h.eps_inside_sqrt ? round_to<S>(sqrt_rn(round_to<S>(add_rn(sv, eps))))
                                      : round_to<S>(add_rn(round_to<S>(sqrt_rn(sv)), eps));
    const M q = round_to<S>(div_rn(g, denom));
    M pv = static_cast<M>(p[e]);
    if constexpr (sizeof(S) == sizeof(M)) {
      pv = fma_(neg_clr, q, pv);
    } else {
      pv = add_rn(pv, round_to<S>(mul_rn(neg_clr, q)));
    }
    s[e] = static_cast<S>(sv);
    p[e] = static_cast<S>(pv);
  }
}

template <typename S>
void launch_sparse(const SparseParam& sp, const SortedRows& rows, const StepRef& step,
                   const Hyper& hyper, cudaStream_t stream) {
  const SparseArgs<S> args{static_cast<S*>(sp.param.data_ptr()), static_cast<S*>(sp.sum.data_ptr()),
                           static_cast<S*>(sp.values.data_ptr()),
                           rows.sorted.const_data_ptr<int64_t>(), rows.perm.const_data_ptr<int64_t>(),
                           sp.values.size(0), sp.row_len, step};
  const int64_t blocks = (args.nnz + kSparseWarps - 1) / kSparseWarps;
  sparse_adagrad_kernel<S><<<static_cast<unsigned>(blocks), kSparseThreads, 0, stream>>>(args, hyper);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The element-wise launches of one group on one device.
void launch_group(const DeviceStep& d) {
  const StepOptions& o = d.plan.options;
  std::vector<Entry> entries[kSlots];
  for (const DenseGroup& group : d.plan.dense) {
    if (group.device != d.device.device) continue;
    for (const DenseParam& w : group.params) {
      entries[dtype_slot(group.dtype)].push_back(
          Entry{{w.param.data_ptr(), w.grad.data_ptr(), w.sum.data_ptr()},
                w.param.numel(),
                step_ref(d.step_of[w.index])});
    }
  }
  Hyper hyper{d.device.lr, o.lr_decay, o.weight_decay, o.eps, o.maximize, o.eps_inside_sqrt, true,
              d.device.amp};
  launch_update<float>(entries[kSlotF32], hyper, d.stream);
  launch_update<double>(entries[kSlotF64], hyper, d.stream);
  launch_update<c10::Half>(entries[kSlotF16], hyper, d.stream);
  launch_update<c10::BFloat16>(entries[kSlotBF16], hyper, d.stream);
  hyper.fma_weight_decay = false;
  launch_update<float>(entries[kSlotC64], hyper, d.stream);
  launch_update<double>(entries[kSlotC128], hyper, d.stream);

  hyper.fma_weight_decay = true;
  for (size_t k = 0; k < d.plan.sparse.size(); ++k) {
    const SparseParam& sp = d.plan.sparse[k];
    if (sp.param.device() != d.device.device) continue;
    const StepRef step = step_ref(d.step_of[sp.index]);
    switch (sp.param.scalar_type()) {
      case at::kFloat: launch_sparse<float>(sp, d.sorted_rows[k], step, hyper, d.stream); break;
      case at::kDouble: launch_sparse<double>(sp, d.sorted_rows[k], step, hyper, d.stream); break;
      case at::kHalf: launch_sparse<c10::Half>(sp, d.sorted_rows[k], step, hyper, d.stream); break;
      case at::kBFloat16:
        launch_sparse<c10::BFloat16>(sp, d.sorted_rows[k], step, hyper, d.stream);
        break;
      default: TORCH_INTERNAL_ASSERT(false, "sparse grads of ", sp.param.scalar_type());
    }
  }
}

void adagrad_step_cuda(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                       at::TensorList steps, double lr, double lr_decay, double weight_decay,
                       double eps, bool maximize, bool eps_inside_sqrt,
                       const std::optional<at::Tensor>& lr_tensor) {
  const StepOptions o{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  run_elementwise_plans({plan_step(Variant::Elementwise, params, grads.vec(), sums, steps, o)},
                        params, steps);
}

void step_groups_cuda(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                      at::TensorList steps, c10::IntArrayRef group_sizes, c10::ArrayRef<double> lr,
                      c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                      c10::ArrayRef<double> eps, const c10::List<bool>& maximize,
                      const c10::List<bool>& eps_inside_sqrt, const OptionalTensorList& lr_tensor,
                      bool rowwise, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const Variant variant = rowwise ? Variant::RowWise : Variant::Elementwise;
  const std::vector<GroupSpan> spans = group_spans(
      {group_sizes, lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor});
  const std::vector<StepPlan> plans =
      plan_groups(variant, params, grads.vec(), sums, steps, spans, true, {grad_scale, found_inf});
  if (rowwise) {
    run_rowwise_plans(plans, params, steps);
  } else {
    run_elementwise_plans(plans, params, steps);
  }
}

bool stream_is_capturing(const at::Device& device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(),
                                       &status));
  return status != cudaStreamCaptureStatusNone;
}

CudaLaunchInfo launch_info() {
  CudaLaunchInfo info;
  info.chunk_elements = kChunkSize;
  info.small_table_tensors = SmallTable::kMaxTensors;
  info.small_table_chunks = SmallTable::kMaxBlocks;
#if FUSED_ADAGRAD_LARGE_KERNEL_ARGS
  info.large_table_tensors = LargeTable::kMaxTensors;
  info.large_table_chunks = LargeTable::kMaxBlocks;
#endif
  // build_info() must answer without a GPU or driver, where asking the runtime would throw.
  info.large_tables_usable = c10::cuda::device_count() > 0 && runtime_takes_large_args();
  return info;
}

// The plan asks through these whether a step is being captured, and build_info() how work is
// split into launches (csrc/plan.h).
[[maybe_unused]] const bool queries_registered =
    (set_capture_query(&stream_is_capturing), set_cuda_launch_query(&launch_info), true);

}  // namespace

void run_elementwise_plans(const std::vector<StepPlan>& plans, at::TensorList params,
                           at::TensorList steps) {
  run_plans(Variant::Elementwise, plans, params, steps, &launch_group);
}

// A sparse CUDA grad in the list makes the dispatcher pick SparseCUDA; the same code handles it.
#define FUSED_ADAGRAD_CUDA_IMPLS(m)                  \
  m.impl("adagrad_step_", &adagrad_step_cuda);       \
  m.impl("adagrad_step_groups_", &step_groups_cuda)
TORCH_LIBRARY_IMPL(fused_adagrad, CUDA, m) { FUSED_ADAGRAD_CUDA_IMPLS(m); }
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCUDA, m) { FUSED_ADAGRAD_CUDA_IMPLS(m); }

}  // namespace fused_adagrad::cuda
