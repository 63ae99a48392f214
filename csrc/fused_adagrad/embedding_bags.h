// Embedding tables whose backward is their Adagrad step (included by fused_adagrad.h): the
// LibTorch module FusedEmbeddingBags and the two ops it runs.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/options/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fused_adagrad {

// One table of a FusedEmbeddingBags: `rows` ids, each a row of `dim` values; a bag's ids equal
// to padding_idx (negative: counted from the end, as nn::EmbeddingBag's) are left out of it.
struct EmbeddingTable {
  int64_t rows, dim;
  std::optional<int64_t> padding_idx = std::nullopt;
};

struct FUSED_ADAGRAD_API FusedEmbeddingBagsOptions {
  /* implicit */ FusedEmbeddingBagsOptions(std::vector<EmbeddingTable> tables);
  TORCH_ARG(std::vector<EmbeddingTable>, tables);
  // Pooling of a bag: torch::kSum or torch::kMean.
  TORCH_ARG(torch::nn::EmbeddingBagMode, mode) = torch::kSum;
  // offsets end with the end of the last bag (tables * batch + 1 of them), as TorchRec's do.
  TORCH_ARG(bool, include_last_offset) = false;
  // The optimizer: element-wise Adagrad (FusedAdagrad's numbers) or row-wise (RowWiseAdagrad's).
  TORCH_ARG(bool, rowwise) = false;
  TORCH_ARG(double, lr) = 1e-2;
  TORCH_ARG(double, lr_decay) = 0;
  TORCH_ARG(double, weight_decay) = 0;  // row-wise only, on the rows a batch touches
  TORCH_ARG(double, initial_accumulator_value) = 0;
  TORCH_ARG(double, eps) = 1e-10;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(bool, eps_inside_sqrt) = false;
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

// Several embedding-bag tables in one module, updated by Adagrad inside backward: the sparse
// grads nn::EmbeddingBag(sparse=true) would make are never made, and no optimizer step follows.
// The numbers are those of nn::EmbeddingBag tables stepped by FusedAdagrad (RowWiseAdagrad with
// rowwise(true)) after each backward.
//
//   FusedEmbeddingBags bags(FusedEmbeddingBagsOptions({{1000000, 64}, {50000, 16}}).lr(0.05));
//   torch::Tensor pooled = bags(indices, offsets);  // (batch, 64 + 16)
//   loss_of(pooled).backward();                     // the tables are stepped here
//
// indices hold every table's ids, table after table; offsets start each bag, batch per table
// (nn::EmbeddingBag's convention, for all tables at once). forward checks every id and offset
// first. Each weight is a parameter ("weight_<t>") that gets no grad; its Adagrad state is
// buffers ("sum_<t>", "step_<t>"), so torch::save(bags) keeps it. A backward can update the
// tables only once, and only while they hold the values its forward saw: a second backward
// through the same graph, or a backward after another one updated the tables since this
// forward (grads accumulated over several forwards), throws instead. Change the learning rate
// with options.lr(...) between steps.
class FUSED_ADAGRAD_API FusedEmbeddingBagsImpl : public torch::nn::Module {
 public:
  explicit FusedEmbeddingBagsImpl(FusedEmbeddingBagsOptions options);

  // per_sample_weights: one per id, sum mode only. Returns (batch, sum of the dims).
  torch::Tensor forward(const torch::Tensor& indices, const torch::Tensor& offsets,
                        const torch::Tensor& per_sample_weights = {});
  // The output split by table: (batch, dim of table t) views.
  std::vector<torch::Tensor> split(const torch::Tensor& output) const;

  FusedEmbeddingBagsOptions options;
  std::vector<torch::Tensor> weights, sums, steps;
  // Backwards that have updated the tables.
  int64_t updates() const { return updates_; }

  // The ops' view of the options: mode 0 sum, 1 mean; padding_idx per table, -1 for none.
  int64_t mode_code() const;
  const std::vector<int64_t>& padding_idx() const { return padding_idx_; }
  // For the backward (the autograd function in csrc/embedding_bags.cpp).
  void step_from_output_grad(const torch::Tensor& grad_output, const torch::Tensor& indices,
                             const torch::Tensor& offsets, const torch::Tensor& per_sample_weights,
                             int64_t updates_seen_by_forward);

 private:
  std::vector<int64_t> padding_idx_;  // -1 for none
  int64_t updates_ = 0;
};
TORCH_MODULE(FusedEmbeddingBags);

// The ops (csrc/ops.cpp has the schemas), through the dispatcher. mode (the schemas' `pooling`):
// 0 sum, 1 mean;
// padding_idx: one per table, -1 for none.
FUSED_ADAGRAD_API torch::Tensor embedding_bags_forward(
    at::TensorList weights, const torch::Tensor& indices, const torch::Tensor& offsets,
    const std::optional<torch::Tensor>& per_sample_weights, int64_t mode,
    c10::IntArrayRef padding_idx, bool include_last_offset);
FUSED_ADAGRAD_API void embedding_bags_adagrad_step_(
    at::TensorList weights, at::TensorList sums, at::TensorList steps,
    const torch::Tensor& grad_output, const torch::Tensor& indices, const torch::Tensor& offsets,
    const std::optional<torch::Tensor>& per_sample_weights, int64_t mode,
    c10::IntArrayRef padding_idx, bool include_last_offset, bool rowwise, double lr,
    double lr_decay, double weight_decay, double eps, bool maximize, bool eps_inside_sqrt,
    const std::optional<torch::Tensor>& lr_tensor = std::nullopt);

}  // namespace fused_adagrad
