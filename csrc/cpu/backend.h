// The CPU backend's entry points for a plan (also used by the CUDA backend for the CPU params of
// a call that reached it: a group mixing CPU and CUDA params) and the pieces of the sparse step
// that the embedding-bag step (embedding_bags_cpu.cpp) shares with it.
#pragma once

#include "../plan.h"
#include "kernel.h"

#include <vector>

namespace fused_adagrad::cpu {

// Increments the steps of the plan's CPU params and updates them (params on other devices are
// left to their backend). `params` and `steps` are the op's lists (the plan's group is a slice of
// them). Does not write staged copies back: the caller calls plan.write_back().
void run_plan(Variant variant, const StepPlan& plan, at::TensorList params, at::TensorList steps);

// A sparse update's entries sorted by the table row they add to (SparseUpdate's order,
// segments and rows).
struct RowSegments {
  std::vector<int64_t> order, segments, rows;
};

// Sorts `entries` (in entry order) by row_of[entry], stably, and finds the distinct rows.
RowSegments segment_by_row(const int64_t* row_of, std::vector<int64_t> entries, int64_t row_count);

// The update of a table (param, sum) by the segmented entries: entry e's grad row is row e of
// `values` (a COO grad's), until the caller sets value_row and entry_scale; options unset.
SparseUpdate sparse_update(const RowSegments& segments, const at::Tensor& param,
                           const at::Tensor& sum, const void* values, int64_t row_len);

inline void set_sparse_options(SparseUpdate& u, Variant variant, const StepOptions& o, double neg_clr) {
  u.neg_clr = neg_clr;
  u.weight_decay = variant == Variant::RowWise ? o.weight_decay : 0.0;
  u.eps = o.eps;
  u.maximize = o.maximize;
  u.eps_inside_sqrt = o.eps_inside_sqrt;
}

Dtype kernel_dtype(at::ScalarType t);

// Runs a sparse update over all its distinct rows, over the threads. They are split by work, a
// row counting its entries plus one, so that a hot row (Zipf ids) does not leave most of the
// step to one thread; each part gets a scratch row of its own.
void run_sparse_update(SparseRangeFn fn, const SparseUpdate& u, int64_t rows);

// The selected kernel's sparse update (element-wise or row-wise); throws for a bad
// FUSED_ADAGRAD_CPU_KERNEL request.
SparseRangeFn sparse_kernel(Variant variant);

}  // namespace fused_adagrad::cpu
