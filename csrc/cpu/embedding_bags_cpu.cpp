// CPU backend of embedding_bags_adagrad_step_: the Adagrad step of embedding tables straight from
// their bags' output grad. A table's looked-up ids are the entries of a sparse update
// (kernel.h, SparseUpdate) whose grad rows are read from the output grad of the bag each id
// belongs to, scaled by its per_sample_weight or 1 / bag size: exactly the rows, in the order,
// that nn.EmbeddingBag(sparse=True)'s backward would write into a sparse grad, which is never
// made.
#include "backend.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fused_adagrad::cpu {

namespace {

// One table's update, laid out for the sparse kernels.
struct TableWork {
  RowSegments segments;
  std::vector<int64_t> bag_of;  // each entry's bag
  at::Tensor entry_scale;       // per entry, of the table's dtype; undefined for none
  SparseUpdate update;
};

TableWork table_work(const BagTable& table, const at::Tensor& weight, const at::Tensor& sum,
                     const at::Tensor& grad_output, int64_t mode) {
  TableWork w;
  const int64_t n = table.indices.numel();
  const int64_t batch = static_cast<int64_t>(table.offsets.size()) - 1;
  const int64_t* ids = table.indices.const_data_ptr<int64_t>();
  w.bag_of.resize(n);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t e = table.offsets[b]; e < table.offsets[b + 1]; ++e) w.bag_of[e] = b;
  }
  // Ids equal to padding_idx take no part (nn.EmbeddingBag gives them no grad and no bag size).
  std::vector<int64_t> entries;
  entries.reserve(n);
  for (int64_t e = 0; e < n; ++e) {
    if (ids[e] != table.padding_idx) entries.push_back(e);
  }
  if (mode == 1) {
    // torch's mean backward: grad * (1 / bag_size), with the reciprocal in the table's dtype.
    at::Tensor sizes = at::zeros({batch}, at::kLong);
    int64_t* size = sizes.data_ptr<int64_t>();
    for (int64_t e : entries) ++size[w.bag_of[e]];
    const at::Tensor inverse = 1 / sizes.to(weight.scalar_type());
    w.entry_scale = inverse.index_select(0, at::from_blob(w.bag_of.data(), {n}, at::kLong));
  } else if (table.per_sample_weights.defined()) {
    w.entry_scale = table.per_sample_weights;
  }
  w.segments = segment_by_row(ids, std::move(entries), weight.size(0));
  const int64_t dim = weight.size(1);
  const char* values = static_cast<const char*>(grad_output.const_data_ptr()) +
                       table.column * grad_output.element_size();
  w.update = sparse_update(w.segments, weight, sum, values, dim);
  w.update.value_row = w.bag_of.data();
  w.update.value_stride = grad_output.stride(0);
  w.update.entry_scale = w.entry_scale.defined() ? w.entry_scale.const_data_ptr() : nullptr;
  return w;
}

void embedding_bags_step_cpu(at::TensorList weights, at::TensorList sums, at::TensorList steps,
                             const at::Tensor& grad_output, const at::Tensor& indices,
                             const at::Tensor& offsets,
                             const std::optional<at::Tensor>& per_sample_weights, int64_t mode,
                             c10::IntArrayRef padding_idx, bool include_last_offset, bool rowwise,
                             double lr, double lr_decay, double weight_decay, double eps,
                             bool maximize, bool eps_inside_sqrt,
                             const std::optional<at::Tensor>& lr_tensor) {
  const Variant variant = rowwise ? Variant::RowWise : Variant::Elementwise;
  const StepOptions o{lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor};
  const BagsArgs args{weights, indices, offsets, per_sample_weights, mode, padding_idx,
                      include_last_offset};
  const BagsPlan plan = plan_bags(args, true);
  check_bags_step(variant, args, plan, sums, steps, grad_output, o);
  const SparseRangeFn fn = sparse_kernel(variant);  // may throw for a bad override: nothing changed
  // The kernels read rows of unit stride: a broadcast grad (loss = out.sum()) has row stride 0,
  // which they take as it is.
  const at::Tensor grad = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();

  // Sorting each table's ids by row is most of the work before the update: tables over threads.
  const int64_t tables = static_cast<int64_t>(weights.size());
  std::vector<TableWork> work(tables);
  at::parallel_for(0, tables, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      work[t] = table_work(plan.tables[t], weights[t], sums[t], grad, mode);
    }
  });

  // Steps and learning rates: nothing below can fail. Every table steps, touched or not, as
  // each would with an (empty) sparse grad of its own.
  const HostLearningRate host_lr = host_learning_rate(o);
  for (int64_t t = 0; t < tables; ++t) {
    set_sparse_options(work[t].update, variant, o,
                       neg_clr(host_lr, increment_host_step(steps[t]), o.lr_decay));
  }
  for (const TableWork& w : work) {
    run_sparse_update(fn, w.update, static_cast<int64_t>(w.segments.rows.size()));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_adagrad, CPU, m) {
  m.impl("embedding_bags_adagrad_step_", &embedding_bags_step_cpu);
}

}  // namespace fused_adagrad::cpu
