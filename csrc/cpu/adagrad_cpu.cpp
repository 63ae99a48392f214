// CPU implementation of fused_adagrad::adagrad_step_: validates, increments steps, then runs the
// element update of all dense params in one parallel region split evenly over the threads, and
// the sparse-grad params' update over their distinct rows (no coalesce, no densified grad).
#include "../step_common.h"
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

struct KernelChoice {
  const char* name;
  UpdateRangeFn fn;
  SparseRangeFn sparse_fn;
};

bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The best path this CPU runs, unless FUSED_ADAGRAD_CPU_KERNEL names a lower one (for tests and
// benchmarks; asking for one the CPU lacks is an error, not a silent fallback).
KernelChoice choose_kernel() {
  const char* forced = std::getenv("FUSED_ADAGRAD_CPU_KERNEL");
  const std::string want = forced ? forced : "";
#if defined(__x86_64__)
  if ((want.empty() || want == "avx512") && cpu_has_avx512()) {
    return {"avx512", avx512::update_range, avx512::sparse_update_range};
  }
  if ((want.empty() || want == "avx512" || want == "avx2") && cpu_has_avx2()) {
    TORCH_CHECK(want != "avx512", "FUSED_ADAGRAD_CPU_KERNEL=avx512 but this CPU or build lacks AVX-512");
    return {"avx2", avx2::update_range, avx2::sparse_update_range};
  }
#endif
  TORCH_CHECK(want.empty() || want == "base", "FUSED_ADAGRAD_CPU_KERNEL=", want,
              " is not available on this CPU or build (choose base, avx2 or avx512)");
  return {"base", base::update_range, base::sparse_update_range};
}

const KernelChoice& kernel() {
  static const KernelChoice choice = choose_kernel();
  return choice;
}

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

// Below this many elements in total a step runs on the calling thread.
constexpr int64_t kGrainSize = 32768;

// A param whose param, grad and sum do not share one dense memory layout is updated through
// contiguous copies that are written back afterwards (rare: a layout autograd never produces
// for a plain parameter, e.g. a strided slice).
struct Staged {
  at::Tensor param, sum;            // the user's tensors
  at::Tensor param_work, sum_work;  // what the kernel updated
};

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return b.strides() == a.strides() && b.is_non_overlapping_and_dense();
}

// Value rows in order of the table row they update, ties in grad order: a stable LSD radix sort
// on 8-bit digits of the row id, O(nnz) per digit, buffers sized by nnz (never by the table).
std::vector<int64_t> order_by_row(const std::vector<int64_t>& row_of, int64_t rows) {
  const size_t n = row_of.size();
  std::vector<int64_t> order(n), next(n);
  for (size_t k = 0; k < n; ++k) order[k] = static_cast<int64_t>(k);
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < rows) ++bits;
  for (int shift = 0; shift < bits; shift += 8) {
    size_t start[257] = {0};
    for (int64_t k : order) ++start[((row_of[k] >> shift) & 255) + 1];
    for (int d = 0; d < 256; ++d) start[d + 1] += start[d];
    for (int64_t k : order) next[start[(row_of[k] >> shift) & 255]++] = k;
    order.swap(next);
  }
  return order;
}

// One param with a sparse COO grad, laid out for kernel().sparse_fn: its distinct rows, the
// grad's value rows in row order, and the (staged, if not contiguous) param and sum.
struct SparseWork {
  size_t index;
  at::Tensor param, sum, values, scratch;  // param and sum: what the kernel updates
  std::vector<int64_t> order, segments, rows, scratch_row;
  SparseUpdate update;
};

SparseWork plan_sparse(size_t index, const at::Tensor& param, const at::Tensor& grad,
                       const at::Tensor& sum, Dtype dtype, std::vector<Staged>& staged) {
  SparseWork w;
  w.index = index;
  const std::vector<int64_t> row_of = sparse_grad_rows(index, grad);  // throws on a bad index
  int64_t rows = 1;
  for (int64_t d = 0; d < grad.sparse_dim(); ++d) rows *= grad.size(d);
  w.order = order_by_row(row_of, rows);
  for (size_t j = 0; j < w.order.size(); ++j) {
    const int64_t r = row_of[w.order[j]];
    if (j == 0 || r != w.rows.back()) {
      w.segments.push_back(static_cast<int64_t>(j));
      w.rows.push_back(r);
    }
  }
  w.segments.push_back(static_cast<int64_t>(w.order.size()));
  int64_t repeated = 0;  // rows seen more than once, each summed into a scratch row of its own
  w.scratch_row.resize(w.rows.size());
  for (size_t k = 0; k < w.rows.size(); ++k) {
    w.scratch_row[k] = w.segments[k + 1] - w.segments[k] > 1 ? repeated++ : -1;
  }

  // The kernel addresses rows as param + row * row_len: a table that is not contiguous (rare for
  // an embedding) is updated through contiguous copies, written back afterwards.
  w.param = param.is_contiguous() ? param : param.contiguous();
  w.sum = sum.is_contiguous() ? sum : sum.contiguous();
  if (!w.param.is_same(param) || !w.sum.is_same(sum)) staged.push_back({param, sum, w.param, w.sum});
  w.values = grad._values().contiguous();
  const int64_t row_len = param.numel() / rows;
  if (repeated > 0) w.scratch = at::empty({repeated, row_len}, w.values.options());
  w.update = SparseUpdate{w.param.data_ptr(), w.sum.data_ptr(), w.values.const_data_ptr(),
                          repeated > 0 ? w.scratch.data_ptr() : nullptr, w.scratch_row.data(),
                          w.order.data(), w.segments.data(), w.rows.data(), row_len, dtype,
                          0.0, 0.0, false, false};
  return w;
}

}  // namespace

const char* selected_kernel_name() { return kernel().name; }

std::vector<std::string> compiled_kernel_names() {
  std::vector<std::string> names{"base"};
#if defined(__x86_64__)
  names.emplace_back("avx2");
  names.emplace_back("avx512");
#endif
  return names;
}

void adagrad_step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                      at::TensorList steps, double lr, double lr_decay, double weight_decay,
                      double eps, bool maximize, bool eps_inside_sqrt,
                      const std::optional<at::Tensor>& lr_tensor) {
  check_inputs(params, grads, sums, steps, weight_decay);
  const KernelChoice& chosen = kernel();  // may throw for a bad override: still nothing changed

  // Slices per dtype; one parallel region per dtype present (usually one).
  struct Group {
    std::vector<Slice> slices;
    std::vector<int64_t> ends;
  };
  Group groups[kNumDtypes];
  std::vector<Staged> staged;
  std::vector<at::Tensor> grad_copies;  // keeps the kernel's grad buffers alive until it is done
  std::vector<SparseWork> sparse;

  // Pass 1: lay out the work (this may allocate staging copies, so it runs before any change).
  std::vector<size_t> with_grad;                 // params that take a step
  std::vector<std::pair<int, size_t>> slice_of;  // their (dtype group, slice) or (-1, 0)
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> g_opt = grads[i];
    if (!g_opt.has_value() || !g_opt->defined()) continue;  // no grad: no step, like torch
    if (g_opt->is_sparse() || params[i].numel() == 0) {
      with_grad.push_back(i);
      slice_of.emplace_back(-1, 0);
      if (params[i].numel() != 0 && g_opt->_nnz() != 0) {
        sparse.push_back(plan_sparse(i, params[i], *g_opt, sums[i],
                                     kernel_dtype(params[i].scalar_type()), staged));
      }
      continue;
    }
    at::Tensor p = params[i], g = *g_opt, s = sums[i];
    const int d = static_cast<int>(kernel_dtype(p.scalar_type()));
    if (p.is_complex()) {
      p = at::view_as_real(p);
      g = at::view_as_real(g);
      s = at::view_as_real(s);
    }
    at::Tensor p_work = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    // empty_like of a dense tensor keeps its strides, so all three then share one layout.
    if (!same_dense_layout(p_work, g)) {
      g = at::empty_like(p_work).copy_(g);
      grad_copies.push_back(g);
    }
    at::Tensor s_work = same_dense_layout(p_work, s) ? s : at::empty_like(p_work).copy_(s);
    if (!p_work.is_same(p) || !s_work.is_same(s)) staged.push_back({p, s, p_work, s_work});

    Group& grp = groups[d];
    grp.slices.push_back({p_work.data_ptr(), g.data_ptr(), s_work.data_ptr(), 0.0});
    grp.ends.push_back((grp.ends.empty() ? 0 : grp.ends.back()) + p_work.numel());
    with_grad.push_back(i);
    slice_of.emplace_back(d, grp.slices.size() - 1);
  }

  // Pass 2: steps and learning rates. Nothing below can fail on valid inputs.
  size_t next_sparse = 0;
  for (size_t k = 0; k < with_grad.size(); ++k) {
    const size_t i = with_grad[k];
    const double clr = neg_clr(lr, lr_tensor, increment_host_step(steps[i]), lr_decay);
    if (slice_of[k].first >= 0) {
      groups[slice_of[k].first].slices[slice_of[k].second].neg_clr = clr;
    } else if (next_sparse < sparse.size() && sparse[next_sparse].index == i) {
      SparseUpdate& u = sparse[next_sparse++].update;
      u.neg_clr = clr;
      u.eps = eps;
      u.maximize = maximize;
      u.eps_inside_sqrt = eps_inside_sqrt;
    }
  }

  for (int d = 0; d < kNumDtypes; ++d) {
    Group& grp = groups[d];
    if (grp.slices.empty()) continue;
    const Update update{grp.slices.data(), grp.ends.data(), static_cast<int64_t>(grp.slices.size()),
                        static_cast<Dtype>(d), weight_decay, eps, maximize, eps_inside_sqrt};
    at::parallel_for(0, grp.ends.back(), kGrainSize, [&](int64_t begin, int64_t end) {
      chosen.fn(update, begin, end);
    });
  }

  // Distinct rows over the threads, at least kGrainSize elements of work per chunk.
  for (const SparseWork& w : sparse) {
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, w.update.row_len));
    at::parallel_for(0, static_cast<int64_t>(w.rows.size()), grain, [&](int64_t begin, int64_t end) {
      chosen.sparse_fn(w.update, begin, end);
    });
  }

  for (const Staged& st : staged) {
    if (!st.param_work.is_same(st.param)) st.param.copy_(st.param_work);
    if (!st.sum_work.is_same(st.sum)) st.sum.copy_(st.sum_work);
  }
}

TORCH_LIBRARY_IMPL(fused_adagrad, CPU, m) { m.impl("adagrad_step_", &adagrad_step_cpu); }
// A sparse grad in the list makes the dispatcher pick the sparse key; the same code handles it
// (COO) or rejects it naming the param (CSR and other compressed layouts).
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCPU, m) { m.impl("adagrad_step_", &adagrad_step_cpu); }
TORCH_LIBRARY_IMPL(fused_adagrad, SparseCsrCPU, m) { m.impl("adagrad_step_", &adagrad_step_cpu); }

}  // namespace fused_adagrad::cpu
