// The layer between the ops and the kernels (../shared/reference/architecture.md): every backend
// hands a step's tensors to plan_groups (or plan_step, for one param group), which validates all
// of them, then lays out each group's work as homogeneous sets (one device and dtype, one memory
// layout) for the kernels. Everything that can fail happens here, before any tensor changes;
// after it, a backend only increments steps, runs its kernels and calls write_back().
#pragma once

#include "fused_adagrad/fused_adagrad.h"

#include <vector>

namespace fused_adagrad {

// Element-wise Adagrad keeps one sum per element (torch.optim.Adagrad); row-wise keeps one per
// row of dim 0 (FBGEMM's EXACT_ROWWISE_ADAGRAD), in float32 (float64 for float64 params).
enum class Variant { Elementwise, RowWise };

// The hyperparameters of one param group.
struct StepOptions {
  double lr, lr_decay, weight_decay, eps;
  bool maximize, eps_inside_sqrt;
  std::optional<at::Tensor> lr_tensor;  // when given, takes the place of lr
};

// One param group of an op call: `count` params from `begin` in the op's lists.
struct GroupSpan {
  size_t begin, count;
  StepOptions options;
};

// Checks the metadata of the scaling tensors (one element, float32, on the CPU or a CUDA device).
void check_grad_scaling(const GradScaling& scaling);

// The op's grads (None for a param without one), sliceable per group.
using GradList = c10::ArrayRef<std::optional<at::Tensor>>;

// The per-group arguments of adagrad_step_groups_ (one entry per group), as the dispatcher
// hands them over, and the spans they describe; throws if the lists disagree in length.
struct GroupArgs {
  c10::IntArrayRef sizes;
  c10::ArrayRef<double> lr, lr_decay, weight_decay, eps;
  const c10::List<bool>& maximize;
  const c10::List<bool>& eps_inside_sqrt;
  const OptionalTensorList& lr_tensor;
};
std::vector<GroupSpan> group_spans(const GroupArgs& args);

// The shape and dtype of a row-wise sum for `param`: (rows,) or () for a 0-d param.
std::vector<int64_t> rowwise_sum_shape(const at::Tensor& param);
at::ScalarType rowwise_sum_dtype(at::ScalarType param_dtype);

// Checks the metadata of every tensor (so it also runs on meta and fake tensors) and throws
// (TORCH_CHECK, RuntimeError in Python) naming the param's index and the problem.
void check_metadata(Variant variant, at::TensorList params, GradList grads, at::TensorList sums,
                    at::TensorList steps, double weight_decay,
                    const std::optional<at::Tensor>& lr_tensor);

// check_metadata for each group of a call over several; with name_groups, errors name the group
// ("param group 1, param 0: ...").
void check_group_metadata(Variant variant, at::TensorList params, GradList grads,
                          at::TensorList sums, at::TensorList steps,
                          const std::vector<GroupSpan>& groups, bool name_groups);

// Whether work queued now on a device's current stream is being captured into a CUDA graph.
// The CUDA backend registers it; without one nothing is ever captured.
using CaptureQuery = bool (*)(const at::Device& device);
void set_capture_query(CaptureQuery query);

// The CUDA backend's launch geometry for build_info() (csrc/ops.cpp), registered the same way.
using CudaLaunchQuery = CudaLaunchInfo (*)();
void set_cuda_launch_query(CudaLaunchQuery query);
CudaLaunchInfo cuda_launch_info();

// One param with a dense grad, as a kernel walks it: param, grad and sum share one dense layout
// (element-wise) or param and grad are contiguous rows and sum is one value per row (row-wise).
// Complex params arrive as their real views.
struct DenseParam {
  size_t index;  // in the op's lists
  at::Tensor param, grad, sum;
  int64_t row_len;  // elements per row of dim 0 (row-wise kernels)
};

struct DenseGroup {
  at::Device device;
  at::ScalarType dtype;  // the params' own dtype (complex for the real views of complex params)
  std::vector<DenseParam> params;
};

// One param with a sparse COO grad, seen as a table of `row_count` rows of `row_len` elements
// (rows: the sparse dims; row-wise Adagrad takes only sparse grads over dim 0).
struct SparseParam {
  size_t index;
  at::Tensor param, sum;        // contiguous (copies of non-contiguous ones)
  at::Tensor grad;              // the user's grad
  at::Tensor values;            // its values, contiguous: nnz rows of row_len
  std::vector<int64_t> row_of;  // CPU grads: the table row of each value row, checked in range
  int64_t row_count, row_len;
};

// A user tensor the kernel cannot update in place, and the dense copy it updates instead.
struct Staged {
  at::Tensor user, work;
};

// One group's work. Indices (stepping, DenseParam::index, SparseParam::index) count from the
// group's first param, `begin` in the op's lists.
struct StepPlan {
  size_t begin = 0, count = 0;
  StepOptions options;
  std::vector<size_t> stepping;    // params that take a step (have a grad), in order
  std::vector<DenseGroup> dense;   // by (device, dtype), in order of first appearance
  std::vector<SparseParam> sparse;
  std::vector<Staged> staged;
  std::vector<at::Tensor> keep_alive;  // grad copies the kernels read (and, unscaling, staged)
  GradScaling scaling;

  // Copies the staged results back to the user's tensors.
  void write_back() const;
};

// Validates every tensor of every group, then plans each group. Refused, before anything
// changes: bad metadata (check_metadata), tensors of the step that share memory where one of them
// is written (a step given twice, a sum or grad overlapping its param; across groups too), sparse
// grad indices out of range (for a CUDA grad this reads its min and max: one synchronization),
// and, under CUDA graph capture, what a graph would freeze at its captured value (a host step,
// a host lr tensor, host scaling tensors) or cannot replay (a sparse grad). With a grad_scale,
// grads are written too: then no grad may share memory with any other tensor of the step, and a
// grad the kernels read as a copy is staged (written back) like a param.
std::vector<StepPlan> plan_groups(Variant variant, at::TensorList params, GradList grads,
                                  at::TensorList sums, at::TensorList steps,
                                  const std::vector<GroupSpan>& groups, bool name_groups,
                                  const GradScaling& scaling = {});

// plan_groups for one group (the per-group ops), errors naming params by their index alone.
StepPlan plan_step(Variant variant, at::TensorList params, GradList grads, at::TensorList sums,
                   at::TensorList steps, const StepOptions& options);

// One batch of bags over several embedding tables (ops embedding_bags_forward and
// embedding_bags_adagrad_step_), in nn.EmbeddingBag's convention for all tables at once, as
// TorchRec and FBGEMM pass them: `indices` holds every table's ids, table after table; `offsets`
// starts each bag, tables * batch of them, plus with include_last_offset the end of the last bag;
// bags t * batch .. (t + 1) * batch - 1 are table t's. mode (the ops' `pooling`): 0 sum, 1 mean.
struct BagsArgs {
  at::TensorList weights;
  const at::Tensor& indices;
  const at::Tensor& offsets;
  const std::optional<at::Tensor>& per_sample_weights;
  int64_t mode;
  c10::IntArrayRef padding_idx;  // one per table, in [0, rows) or -1 for none
  bool include_last_offset;
};

// Table t's part of a batch, as nn.EmbeddingBag(include_last_offset=True) takes it.
struct BagTable {
  at::Tensor indices;                  // int64, contiguous, on the batch's device
  at::Tensor per_sample_weights;       // undefined without
  std::vector<int64_t> offsets;        // batch + 1 offsets into `indices`, from 0
  int64_t padding_idx, column;         // column: of its first element in an output row
};

struct BagsPlan {
  int64_t batch = 0, width = 0;  // output rows and columns
  std::vector<BagTable> tables;
};

// Checks the tables and the batch and splits it by table. With check_values, also every offset
// and id (out of range or negative: an error naming the table, bag and position); a CUDA batch is
// read on the host for that (a synchronization). Without, only metadata (meta and fake tensors).
BagsPlan plan_bags(const BagsArgs& args, bool check_values);

// The output's shape, (batch, sum of the dims), in symbolic sizes for the meta kernels; checks
// that the offsets split evenly into tables.
std::vector<c10::SymInt> bags_output_shape(at::TensorList weights, const at::Tensor& offsets,
                                           bool include_last_offset);

// Checks a step of the tables' Adagrad before anything changes: the weights, their state (as
// plan_step checks a param's, errors naming "table i") and the output grad's shape.
void check_bags_step(Variant variant, const BagsArgs& args, const BagsPlan& plan,
                     at::TensorList sums, at::TensorList steps, const at::Tensor& grad_output,
                     const StepOptions& options);

// The learning rate as the host reads it, once per step (a device lr tensor synchronizes).
struct HostLearningRate {
  double value;
  bool is_float_tensor;  // torch then divides in float32
};
HostLearningRate host_learning_rate(const StepOptions& options);

// -clr for one parameter, rounded exactly as torch.optim.Adagrad's single-tensor path rounds it:
// in double for a float lr; in the lr tensor's dtype for a tensor lr (torch divides the tensor).
double neg_clr(const HostLearningRate& lr, double step, double lr_decay);

// Whether the step is to be skipped: found_inf read on the host (a synchronization for a device
// tensor), false without one.
bool host_found_inf(const GradScaling& scaling);

// step += 1 on a one-element host tensor; returns the new value as torch reads it (step.item()).
double increment_host_step(const at::Tensor& step);

}  // namespace fused_adagrad
