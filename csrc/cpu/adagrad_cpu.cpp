// CPU backend of the ops adagrad_step_ and rowwise_adagrad_step_: takes the plan (csrc/plan.h),
// increments steps, then runs the update of all dense params of a dtype in one parallel region
// split evenly over the threads, and each sparse-grad param's update over its distinct rows (no
// coalesce, no densified grad).
#include "backend.h"
#include "kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace fused_adagrad::cpu {

namespace {

// Below this many elements in total a step runs on the calling thread.
constexpr int64_t kGrainSize = 32768;

struct KernelChoice {
  UpdateRangeFn fn;
  SparseRangeFn sparse_fn;
  RowRangeFn rowwise_fn;
  SparseRangeFn rowwise_sparse_fn;
  UnscaleFn unscale_fn;
};

// The kernels in order of width; a CPU that runs one runs every one before it.
constexpr const char* kKernelNames[] = {"base", "avx2", "avx512"};

int cpu_isa_level() {
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? 2 : avx2 ? 1 : 0;
#else
  return 0;  // only the portable kernel is compiled in
#endif
}

int level_of(const std::string& name) {
  for (int level = 0; level < 3; ++level) {
    if (name == kKernelNames[level]) return level;
  }
  return -1;
}

// What the selection sees: the CPU's widest kernel, capped by FUSED_ADAGRAD_MAX_ISA, which hides
// wider ones so that a test can play an AVX2-only (or a pre-AVX2) host on any CPU.
struct Selection {
  int runnable_level = 0;  // kernels 0..runnable_level run here
  int chosen_level = -1;   // -1: none, `error` says why
  std::string error;
};

Selection select_kernel() {
  Selection s;
  s.runnable_level = cpu_isa_level();
  std::string cap_note;
  if (const char* cap = std::getenv("FUSED_ADAGRAD_MAX_ISA"); cap && *cap) {
    const int cap_level = level_of(cap);
    if (cap_level < 0) {
      s.error = std::string("FUSED_ADAGRAD_MAX_ISA=") + cap + " is not a kernel name (base, avx2 or avx512)";
      return s;
    }
    if (cap_level < s.runnable_level) {
      s.runnable_level = cap_level;
      cap_note = std::string(", as FUSED_ADAGRAD_MAX_ISA=") + cap + " hides wider ones";
    }
  }
  std::string runnable = kKernelNames[0];
  for (int level = 1; level <= s.runnable_level; ++level) runnable += std::string(", ") + kKernelNames[level];
  const char* forced = std::getenv("FUSED_ADAGRAD_CPU_KERNEL");
  if (!forced || !*forced) {
    s.chosen_level = s.runnable_level;
    return s;
  }
  const int want = level_of(forced);
  if (want < 0) {
    s.error = std::string("FUSED_ADAGRAD_CPU_KERNEL=") + forced +
              " is not a kernel name (base, avx2 or avx512)";
  } else if (want > s.runnable_level) {
    // Asking for a kernel the CPU lacks is an error, not a silent fallback: a test or benchmark
    // that forces one must not measure another.
    s.error = std::string("FUSED_ADAGRAD_CPU_KERNEL=") + forced + ": this CPU cannot run the " +
              forced + " kernel (it runs " + runnable + cap_note + "); unset it or choose one of those";
  } else {
    s.chosen_level = want;
  }
  return s;
}

const Selection& selection() {
  static const Selection s = select_kernel();
  return s;
}

// The best kernel this CPU runs, unless FUSED_ADAGRAD_CPU_KERNEL names a lower one (for tests and
// benchmarks).
KernelChoice choose_kernel() {
  const Selection& s = selection();
  TORCH_CHECK(s.error.empty(), s.error);
  switch (s.chosen_level) {
#if defined(__x86_64__)
    case 2:
      return {avx512::update_range, avx512::sparse_update_range, avx512::rowwise_update_range,
              avx512::rowwise_sparse_update_range, avx512::unscale};
    case 1:
      return {avx2::update_range, avx2::sparse_update_range, avx2::rowwise_update_range,
              avx2::rowwise_sparse_update_range, avx2::unscale};
#endif
    default:
      return {base::update_range, base::sparse_update_range, base::rowwise_update_range,
              base::rowwise_sparse_update_range, base::unscale};
  }
}

const KernelChoice& kernel() {
  static const KernelChoice choice = choose_kernel();
  return choice;
}

}  // namespace

Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kHalf: return Dtype::Half;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kComplexFloat: return Dtype::ComplexFloat;
    case at::kComplexDouble: return Dtype::ComplexDouble;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", t);
  }
}

// Entries in order of the table row they update, ties in entry order: a stable LSD radix sort
// on digits of the row id, O(entries) per digit, buffers sized by the entries (never by the
// table); then the distinct rows and where each one's entries start. Digits of up to 11 bits
// (a 16 KiB histogram, in L1) in as few passes as the table's row count needs: two for up to
// 4M rows.
RowSegments segment_by_row(const int64_t* row_of, std::vector<int64_t> entries, int64_t row_count) {
  RowSegments s;
  s.order = std::move(entries);
  std::vector<int64_t> next(s.order.size());
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < row_count) ++bits;
  const int passes = (bits + 10) / 11;
  const int digit_bits = passes == 0 ? 0 : (bits + passes - 1) / passes;
  const int64_t mask = (int64_t{1} << digit_bits) - 1;
  std::vector<size_t> start(static_cast<size_t>(mask) + 2);
  for (int shift = 0; shift < bits; shift += digit_bits) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t e : s.order) ++start[((row_of[e] >> shift) & mask) + 1];
    for (int64_t d = 0; d <= mask; ++d) start[d + 1] += start[d];
    for (int64_t e : s.order) next[start[(row_of[e] >> shift) & mask]++] = e;
    s.order.swap(next);
  }
  for (size_t j = 0; j < s.order.size(); ++j) {
    const int64_t r = row_of[s.order[j]];
    if (j == 0 || r != s.rows.back()) {
      s.segments.push_back(static_cast<int64_t>(j));
      s.rows.push_back(r);
    }
  }
  s.segments.push_back(static_cast<int64_t>(s.order.size()));
  return s;
}

SparseUpdate sparse_update(const RowSegments& s, const at::Tensor& param, const at::Tensor& sum,
                           const void* values, int64_t row_len) {
  return SparseUpdate{param.data_ptr(), sum.data_ptr(), values, nullptr, row_len, nullptr, nullptr,
                      s.order.data(), s.segments.data(), s.rows.data(), row_len,
                      kernel_dtype(param.scalar_type()), 0.0, 0.0, 0.0, false, false};
}

void run_sparse_update(SparseRangeFn fn, const SparseUpdate& u, int64_t rows) {
  if (rows == 0) return;
  // Row k's work starts at unit segments[k] + k; a part runs the rows that start in it.
  const auto first_row_at = [&](int64_t unit) {
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (u.segments[mid] + mid < unit) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const int64_t units = u.segments[rows] + rows;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, u.row_len));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    const int64_t first = first_row_at(begin), last = first_row_at(end);
    if (first == last) return;
    std::vector<double> scratch(u.row_len);  // room for a row of either summing type
    SparseUpdate part = u;
    part.scratch = scratch.data();
    fn(part, first, last);
  });
}

SparseRangeFn sparse_kernel(Variant variant) {
  return variant == Variant::Elementwise ? kernel().sparse_fn : kernel().rowwise_sparse_fn;
}

namespace {

// With a grad_scale, each thread unscales this many elements of its range and then updates them
// while they are still in its L1 cache (a grad is read from memory once, as without scaling).
constexpr int64_t kUnscaleChunk = 4096;

// One param with a sparse COO grad, laid out for the sparse kernels: its distinct rows and the
// grad's value rows in row order.
struct SparseWork {
  RowSegments segments;
  SparseUpdate update;
};

SparseWork sparse_work(const SparseParam& sp) {
  SparseWork w;
  std::vector<int64_t> entries(sp.row_of.size());
  for (size_t e = 0; e < entries.size(); ++e) entries[e] = static_cast<int64_t>(e);
  w.segments = segment_by_row(sp.row_of.data(), std::move(entries), sp.row_count);
  w.update = sparse_update(w.segments, sp.param, sp.sum, sp.values.const_data_ptr(), sp.row_len);
  return w;
}

// Calls fn(k, offset, n) for the part [offset, offset + n) of slice k that elements
// [begin, end) of a dense group's index space (cumulative counts `ends`) cover.
template <typename Fn>
void for_each_slice_part(const std::vector<int64_t>& ends, int64_t begin, int64_t end, Fn&& fn) {
  size_t k = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
  for (; k < ends.size() && begin < end; ++k) {
    const int64_t start = k == 0 ? 0 : ends[k - 1];
    const int64_t stop = std::min(end, ends[k]);
    fn(k, begin - start, stop - begin);
    begin = stop;
  }
}

// Runs update(begin, end) over [begin, end), first unscaling (with unscale(b, e), which unscales
// the grad elements that update(b, e) reads) kUnscaleChunk elements at a time when asked to.
template <typename Unscale, typename UpdateFn>
void unscale_then_update(bool unscaling, int64_t begin, int64_t end, Unscale&& unscale,
                         UpdateFn&& update) {
  if (!unscaling) return update(begin, end);
  for (int64_t b = begin; b < end; b += kUnscaleChunk) {
    const int64_t e = std::min(end, b + kUnscaleChunk);
    unscale(b, e);
    update(b, e);
  }
}

// The address of element `offset` of a grad of this dtype (for complex: of its real view), for
// unscaling in place.
void* element(const void* base, int64_t offset, at::ScalarType dtype) {
  const int64_t size = static_cast<int64_t>(c10::elementSize(c10::toRealValueType(dtype)));
  return static_cast<char*>(const_cast<void*>(base)) + offset * size;
}

// The element index space of one dense group: the cumulative element counts of its params.
std::vector<int64_t> element_ends(const DenseGroup& group) {
  std::vector<int64_t> ends;
  ends.reserve(group.params.size());
  int64_t total = 0;
  for (const DenseParam& d : group.params) ends.push_back(total += d.param.numel());
  return ends;
}

}  // namespace

void run_plan(Variant variant, const StepPlan& plan, at::TensorList all_params,
              at::TensorList all_steps) {
  const at::TensorList params = all_params.slice(plan.begin, plan.count);
  const at::TensorList steps = all_steps.slice(plan.begin, plan.count);
  const StepOptions& o = plan.options;
  const KernelChoice& chosen = kernel();  // may throw for a bad override: still nothing changed
  // A group of CUDA params alone has nothing here, and its lr, found_inf and grad_scale may be
  // device tensors, which reading below would synchronize (and a stream capture refuses).
  if (std::none_of(plan.stepping.begin(), plan.stepping.end(),
                   [&](size_t i) { return params[i].is_cpu(); })) {
    return;
  }
  if (host_found_inf(plan.scaling)) return;  // GradScaler found an inf: the step changes nothing
  const bool unscaling = plan.scaling.unscales();
  const float grad_scale = unscaling ? plan.scaling.grad_scale->item<float>() : 1.0f;
  std::vector<SparseWork> sparse;
  for (const SparseParam& sp : plan.sparse) {
    if (sp.param.is_cpu()) sparse.push_back(sparse_work(sp));
  }

  // Steps and learning rates: nothing below can fail.
  const HostLearningRate lr = host_learning_rate(o);
  std::vector<double> neg_clrs(params.size(), 0.0);
  for (size_t i : plan.stepping) {
    if (params[i].is_cpu()) {
      neg_clrs[i] = neg_clr(lr, increment_host_step(steps[i]), o.lr_decay);
    }
  }

  // One parallel region per dtype present (usually one), split evenly by elements.
  for (const DenseGroup& group : plan.dense) {
    if (!group.device.is_cpu()) continue;
    const std::vector<int64_t> ends = element_ends(group);
    const Dtype dtype = kernel_dtype(group.dtype);
    if (variant == Variant::Elementwise) {
      std::vector<Slice> slices;
      for (const DenseParam& d : group.params) {
        slices.push_back({d.param.data_ptr(), d.grad.const_data_ptr(), d.sum.data_ptr(), neg_clrs[d.index]});
      }
      const Update update{slices.data(), ends.data(), static_cast<int64_t>(slices.size()), dtype,
                          o.weight_decay, o.eps, o.maximize, o.eps_inside_sqrt};
      const auto unscale = [&](int64_t b, int64_t e) {
        for_each_slice_part(ends, b, e, [&](size_t k, int64_t offset, int64_t n) {
          chosen.unscale_fn(dtype, element(slices[k].grad, offset, group.dtype), n, grad_scale);
        });
      };
      at::parallel_for(0, ends.back(), kGrainSize, [&](int64_t begin, int64_t end) {
        unscale_then_update(unscaling, begin, end, unscale,
                            [&](int64_t b, int64_t e) { chosen.fn(update, b, e); });
      });
    } else {
      std::vector<RowSlice> slices;
      for (const DenseParam& d : group.params) {
        slices.push_back({d.param.data_ptr(), d.grad.const_data_ptr(), d.sum.data_ptr(), d.row_len,
                          neg_clrs[d.index]});
      }
      const RowUpdate update{slices.data(), ends.data(), static_cast<int64_t>(slices.size()), dtype,
                             o.weight_decay, o.eps, o.maximize, o.eps_inside_sqrt};
      // The rows whose first element lies in [b, e): the rows rowwise_fn(update, b, e) updates.
      const auto unscale = [&](int64_t b, int64_t e) {
        for_each_slice_part(ends, b, e, [&](size_t k, int64_t offset, int64_t n) {
          const int64_t len = slices[k].row_len, size = ends[k] - (k == 0 ? 0 : ends[k - 1]);
          const int64_t first = (offset + len - 1) / len * len;
          const int64_t last = std::min(size, (offset + n + len - 1) / len * len);
          if (first < last) {
            chosen.unscale_fn(dtype, element(slices[k].grad, first, group.dtype), last - first,
                              grad_scale);
          }
        });
      };
      at::parallel_for(0, ends.back(), kGrainSize, [&](int64_t begin, int64_t end) {
        unscale_then_update(unscaling, begin, end, unscale,
                            [&](int64_t b, int64_t e) { chosen.rowwise_fn(update, b, e); });
      });
    }
  }

  // Distinct rows over the threads (run_sparse_update).
  size_t next = 0;
  for (const SparseParam& sp : plan.sparse) {
    if (!sp.param.is_cpu()) continue;
    SparseWork& w = sparse[next++];
    set_sparse_options(w.update, variant, o, neg_clrs[sp.index]);
    const SparseRangeFn fn = variant == Variant::Elementwise ? chosen.sparse_fn : chosen.rowwise_sparse_fn;
    if (unscaling) {  // the value rows, before any row sums them (they are few: nnz rows)
      const Dtype dtype = kernel_dtype(sp.values.scalar_type());
      const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, sp.row_len));
      at::parallel_for(0, sp.values.size(0), grain, [&](int64_t begin, int64_t end) {
        chosen.unscale_fn(dtype, element(sp.values.const_data_ptr(), begin * sp.row_len, sp.values.scalar_type()),
                          (end - begin) * sp.row_len, grad_scale);
      });
    }
    run_sparse_update(fn, w.update, static_cast<int64_t>(w.segments.rows.size()));
  }
}

namespace {

void run_plans(Variant variant, const std::vector<StepPlan>& plans, at::TensorList params,
               at::TensorList steps) {
  if (!plans.empty() && host_found_inf(plans.front().scaling)) return;  // nothing to write back
  for (const StepPlan& plan : plans) run_plan(variant, plan, params, steps);
  for (const StepPlan& plan : plans) plan.write_back();
}

template <Variant kVariant>
void step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
              at::TensorList steps, double lr, double lr_decay, double weight_decay, double eps,
              bool maximize, bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  const std::vector<std::optional<at::Tensor>> g = grads.vec();
  const StepOptions o{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  run_plans(kVariant, {plan_step(kVariant, params, g, sums, steps, o)}, params, steps);
}

void step_groups_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                     at::TensorList steps, c10::IntArrayRef group_sizes, c10::ArrayRef<double> lr,
                     c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                     c10::ArrayRef<double> eps, const c10::List<bool>& maximize,
                     const c10::List<bool>& eps_inside_sqrt, const OptionalTensorList& lr_tensor,
                     bool rowwise, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const Variant variant = rowwise ? Variant::RowWise : Variant::Elementwise;
  const std::vector<std::optional<at::Tensor>> g = grads.vec();
  const std::vector<GroupSpan> spans = group_spans(
      {group_sizes, lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor});
  run_plans(variant, plan_groups(variant, params, g, sums, steps, spans, true, {grad_scale, found_inf}),
            params, steps);
}

}  // namespace

std::string selected_kernel_name() {
  const Selection& s = selection();
  return s.chosen_level < 0 ? std::string() : kKernelNames[s.chosen_level];
}

std::string kernel_selection_error() { return selection().error; }

std::vector<std::string> compiled_kernel_names() {
#if defined(__x86_64__)
  return {kKernelNames[0], kKernelNames[1], kKernelNames[2]};
#else
  return {kKernelNames[0]};
#endif
}

std::vector<std::string> runnable_kernel_names() {
  return {std::begin(kKernelNames), std::begin(kKernelNames) + selection().runnable_level + 1};
}

// A sparse grad in the list makes the dispatcher pick the sparse key; the same code handles it
// (COO) or rejects it naming the param (CSR and other compressed layouts).
#define FUSED_ADAGRAD_CPU_IMPLS(m)                                       \
  m.impl("adagrad_step_", &step_cpu<Variant::Elementwise>);             \
  m.impl("rowwise_adagrad_step_", &step_cpu<Variant::RowWise>);         \
  m.impl("adagrad_step_groups_", &step_groups_cpu)
TORCH_LIBRARY_IMPL(fused_adagrad, CPU, m) { FUSED_ADAGRAD_CPU_IMPLS(m); }
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCPU, m) { FUSED_ADAGRAD_CPU_IMPLS(m); }
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCsrCPU, m) { FUSED_ADAGRAD_CPU_IMPLS(m); }

}  // namespace fused_adagrad::cpu
