// The forward of embedding_bags_forward (any device: torch's own embedding_bag per table, so the
// pooled values are nn.EmbeddingBag's to the bit) and the LibTorch module FusedEmbeddingBags,
// whose backward runs embedding_bags_adagrad_step_.
#include "fused_adagrad/fused_adagrad.h"
#include "optimizer_common.h"
#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>

namespace fused_adagrad {

namespace {

at::Tensor bags_forward(at::TensorList weights, const at::Tensor& indices, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& per_sample_weights, int64_t mode,
                        c10::IntArrayRef padding_idx, bool include_last_offset) {
  const BagsPlan plan = plan_bags(
      {weights, indices, offsets, per_sample_weights, mode, padding_idx, include_last_offset}, true);
  std::vector<at::Tensor> pooled;
  for (size_t t = 0; t < weights.size(); ++t) {
    const BagTable& table = plan.tables[t];
    const at::Tensor table_offsets =
        at::tensor(table.offsets, at::TensorOptions(at::kLong)).to(indices.device());
    std::optional<at::Tensor> psw;
    if (table.per_sample_weights.defined()) psw = table.per_sample_weights;
    // The op reads -1 as the last row; no padding is nullopt.
    const std::optional<int64_t> padding =
        table.padding_idx < 0 ? std::nullopt : std::optional<int64_t>(table.padding_idx);
    pooled.push_back(std::get<0>(at::embedding_bag(weights[t], table.indices, table_offsets,
                                                   /*scale_grad_by_freq=*/false, mode,
                                                   /*sparse=*/false, psw,
                                                   /*include_last_offset=*/true, padding)));
  }
  return at::cat(pooled, 1);
}

// Shapes only, in symbolic sizes (torch.compile with dynamic shapes): (batch, sum of the dims).
at::Tensor bags_forward_meta(at::TensorList weights, const at::Tensor& indices,
                             const at::Tensor& offsets,
                             const std::optional<at::Tensor>& per_sample_weights, int64_t mode,
                             c10::IntArrayRef padding_idx, bool include_last_offset) {
  return at::empty_symint(bags_output_shape(weights, offsets, include_last_offset),
                          weights[0].options());
}

using ForwardFn = at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, int64_t, c10::IntArrayRef, bool);

// Keeps the module alive while a graph through its forward exists (the graph may outlive the
// last handle the program holds).
struct ModuleRef : torch::CustomClassHolder {
  explicit ModuleRef(std::shared_ptr<FusedEmbeddingBagsImpl> m) : module(std::move(m)) {}
  std::shared_ptr<FusedEmbeddingBagsImpl> module;
};

// The module's autograd function: forward pools, backward steps the tables and gives no grads.
struct BagsFunction : public torch::autograd::Function<BagsFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               std::shared_ptr<FusedEmbeddingBagsImpl> bags,
                               const torch::Tensor& indices, const torch::Tensor& offsets,
                               const std::optional<torch::Tensor>& per_sample_weights,
                               at::TensorList weights) {
    ctx->saved_data["bags"] = c10::IValue::make_capsule(c10::make_intrusive<ModuleRef>(bags));
    ctx->saved_data["updates"] = bags->updates();
    ctx->saved_data["stepped"] = false;
    ctx->saved_data["inputs"] = static_cast<int64_t>(4 + weights.size());
    // Saved as autograd saves inputs: ids changed in place before backward are refused.
    ctx->save_for_backward({indices, offsets, per_sample_weights.value_or(torch::Tensor())});
    return embedding_bags_forward(weights, indices, offsets, per_sample_weights, bags->mode_code(),
                                  bags->padding_idx(), bags->options.include_last_offset());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["stepped"].toBool(),
                "FusedEmbeddingBags: a second backward through the same forward would update the "
                "tables twice with one batch's grads; its Adagrad step already ran in the first");
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    auto ref = c10::static_intrusive_pointer_cast<ModuleRef>(ctx->saved_data["bags"].toCapsule());
    ref->module->step_from_output_grad(grads[0], saved[0], saved[1], saved[2],
                                       ctx->saved_data["updates"].toInt());
    ctx->saved_data["stepped"] = true;
    return torch::autograd::variable_list(ctx->saved_data["inputs"].toInt());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_adagrad, CompositeExplicitAutograd, m) {
  m.impl("embedding_bags_forward", &bags_forward);
}
TORCH_LIBRARY_IMPL(fused_adagrad, Meta, m) {
  m.impl("embedding_bags_forward", &bags_forward_meta);
}

torch::Tensor embedding_bags_forward(at::TensorList weights, const torch::Tensor& indices,
                                     const torch::Tensor& offsets,
                                     const std::optional<torch::Tensor>& per_sample_weights,
                                     int64_t mode, c10::IntArrayRef padding_idx,
                                     bool include_last_offset) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_adagrad::embedding_bags_forward", "")
                             .typed<ForwardFn>();
  return op.call(weights, indices, offsets, per_sample_weights, mode, padding_idx,
                 include_last_offset);
}

FusedEmbeddingBagsOptions::FusedEmbeddingBagsOptions(std::vector<EmbeddingTable> tables)
    : tables_(std::move(tables)) {}

FusedEmbeddingBagsImpl::FusedEmbeddingBagsImpl(FusedEmbeddingBagsOptions options_)
    : options(std::move(options_)) {
  const FusedEmbeddingBagsOptions& o = options;
  TORCH_CHECK(!o.tables().empty(), "FusedEmbeddingBags: no tables");
  optimizer_common::check_options(o);  // the optimizers' range checks and messages
  TORCH_CHECK(o.rowwise() || o.weight_decay() == 0,
              "FusedEmbeddingBags: weight_decay needs rowwise(true) (element-wise Adagrad refuses "
              "it for sparse grads, as torch::optim::Adagrad does)");
  TORCH_CHECK(!std::holds_alternative<torch::enumtype::kMax>(o.mode()),
              "FusedEmbeddingBags: mode kMax has no fused backward; use kSum or kMean");
  const auto opts = torch::TensorOptions().dtype(o.dtype()).device(o.device());
  const at::ScalarType sum_dtype = o.rowwise() ? rowwise_sum_dtype(o.dtype()) : o.dtype();
  for (size_t t = 0; t < o.tables().size(); ++t) {
    const EmbeddingTable& table = o.tables()[t];
    TORCH_CHECK(table.rows > 0 && table.dim > 0, "FusedEmbeddingBags: table ", t, " has shape (",
                table.rows, ", ", table.dim, ")");
    int64_t pad = table.padding_idx.value_or(-1);
    if (table.padding_idx.has_value()) {
      TORCH_CHECK(pad >= -table.rows && pad < table.rows, "FusedEmbeddingBags: table ", t,
                  ": padding_idx ", pad, " is out of range for ", table.rows, " rows");
      if (pad < 0) pad += table.rows;
    }
    padding_idx_.push_back(pad);
    // nn::EmbeddingBag's initialization: N(0, 1) (randn's own draws), the padding row zero;
    // on huge pages, as the state (advise_huge_pages).
    torch::Tensor w = torch::empty({table.rows, table.dim}, opts);
    advise_huge_pages(w);
    w.normal_();
    if (pad >= 0) w[pad].zero_();
    const std::string index = std::to_string(t);
    weights.push_back(register_parameter("weight_" + index, w));
    const std::vector<int64_t> sum_shape =
        o.rowwise() ? std::vector<int64_t>{table.rows} : std::vector<int64_t>{table.rows, table.dim};
    sums.push_back(register_buffer(
        "sum_" + index, optimizer_common::filled_state(torch::empty(sum_shape, opts.dtype(sum_dtype)),
                                                       o.initial_accumulator_value())));
    steps.push_back(register_buffer("step_" + index, torch::zeros({}, torch::kFloat32)));
  }
}

torch::Tensor FusedEmbeddingBagsImpl::forward(const torch::Tensor& indices,
                                              const torch::Tensor& offsets,
                                              const torch::Tensor& per_sample_weights) {
  auto self = std::dynamic_pointer_cast<FusedEmbeddingBagsImpl>(weak_from_this().lock());
  TORCH_CHECK(self != nullptr, "FusedEmbeddingBags: the module must be owned by a shared_ptr (make "
              "it as fused_adagrad::FusedEmbeddingBags, the module holder), so that backward can "
              "reach it");
  TORCH_CHECK(!per_sample_weights.defined() || !per_sample_weights.requires_grad(),
              "FusedEmbeddingBags: per_sample_weights that require grad are not supported (the "
              "module makes no grads; its backward is the tables' step)");
  std::optional<torch::Tensor> psw;
  if (per_sample_weights.defined()) psw = per_sample_weights;
  return BagsFunction::apply(self, indices, offsets, psw, at::TensorList(weights));
}

int64_t FusedEmbeddingBagsImpl::mode_code() const {
  return std::holds_alternative<torch::enumtype::kMean>(options.mode()) ? 1 : 0;
}

std::vector<torch::Tensor> FusedEmbeddingBagsImpl::split(const torch::Tensor& output) const {
  std::vector<int64_t> dims;
  for (const EmbeddingTable& t : options.tables()) dims.push_back(t.dim);
  return output.split_with_sizes(dims, 1);
}

void FusedEmbeddingBagsImpl::step_from_output_grad(const torch::Tensor& grad_output,
                                                   const torch::Tensor& indices,
                                                   const torch::Tensor& offsets,
                                                   const torch::Tensor& per_sample_weights,
                                                   int64_t updates_seen_by_forward) {
  TORCH_CHECK(updates_seen_by_forward == updates_,
              "FusedEmbeddingBags: the tables were updated by another backward after this "
              "backward's forward ran; its grads belong to the old values, and accumulating "
              "grads over several backwards cannot work when each backward is a step. Run "
              "forward and backward in turn, one optimizer step per batch");
  const FusedEmbeddingBagsOptions& o = options;
  const std::optional<torch::Tensor> psw =
      per_sample_weights.defined() ? std::optional<torch::Tensor>(per_sample_weights) : std::nullopt;
  torch::NoGradGuard no_grad;
  embedding_bags_adagrad_step_(weights, sums, steps, grad_output, indices, offsets, psw, mode_code(),
                               padding_idx_, o.include_last_offset(), o.rowwise(), o.lr(),
                               o.lr_decay(), o.weight_decay(), o.eps(), o.maximize(),
                               o.eps_inside_sqrt());
  ++updates_;
}

}  // namespace fused_adagrad
