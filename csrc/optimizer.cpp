// fused_adagrad::FusedAdagrad, the LibTorch optimizer. Its arithmetic is the adagrad_step_ op.
#include "fused_adagrad/fused_adagrad.h"

#include <torch/autograd.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/utils.h>

namespace fused_adagrad {

FusedAdagradOptions::FusedAdagradOptions(double lr) : lr_(lr) {}

bool operator==(const FusedAdagradOptions& lhs, const FusedAdagradOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.lr_decay() == rhs.lr_decay() &&
         lhs.weight_decay() == rhs.weight_decay() &&
         lhs.initial_accumulator_value() == rhs.initial_accumulator_value() &&
         lhs.eps() == rhs.eps() && lhs.maximize() == rhs.maximize() &&
         lhs.eps_inside_sqrt() == rhs.eps_inside_sqrt();
}

void FusedAdagradOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(initial_accumulator_value);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps_inside_sqrt);
}

void FusedAdagradOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, initial_accumulator_value);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, eps_inside_sqrt);
}

double FusedAdagradOptions::get_lr() const { return lr(); }
void FusedAdagradOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const FusedAdagradParamState& lhs, const FusedAdagradParamState& rhs) {
  return torch::equal(lhs.sum(), rhs.sum()) && torch::equal(lhs.step(), rhs.step());
}

void FusedAdagradParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(sum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
}

void FusedAdagradParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, sum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, step);
}

namespace {

void check_options(const FusedAdagradOptions& o) {
  TORCH_CHECK(o.lr() >= 0, "Invalid learning rate: ", o.lr());
  TORCH_CHECK(o.lr_decay() >= 0, "Invalid lr_decay value: ", o.lr_decay());
  TORCH_CHECK(o.weight_decay() >= 0, "Invalid weight_decay value: ", o.weight_decay());
  TORCH_CHECK(o.initial_accumulator_value() >= 0, "Invalid initial_accumulator_value value: ",
              o.initial_accumulator_value());
  TORCH_CHECK(o.eps() >= 0, "Invalid epsilon value: ", o.eps());
}

// A group's options as recent torch (2.13) resolves them for torch::optim::Adagrad: a field
// left at its FusedAdagradOptions() value takes the optimizer's default, like a key missing from
// a Python param group.
FusedAdagradOptions merge_group_options(const torch::optim::OptimizerOptions& defaults_base,
                                        const torch::optim::OptimizerOptions& group_base) {
  const auto* group = dynamic_cast<const FusedAdagradOptions*>(&group_base);
  TORCH_CHECK(group != nullptr, "FusedAdagrad: param group options must be FusedAdagradOptions");
  const auto& defaults = static_cast<const FusedAdagradOptions&>(defaults_base);
  const FusedAdagradOptions unset;
  FusedAdagradOptions o = defaults;
  if (group->lr() != unset.lr()) o.lr(group->lr());
  if (group->lr_decay() != unset.lr_decay()) o.lr_decay(group->lr_decay());
  if (group->weight_decay() != unset.weight_decay()) o.weight_decay(group->weight_decay());
  if (group->initial_accumulator_value() != unset.initial_accumulator_value()) {
    o.initial_accumulator_value(group->initial_accumulator_value());
  }
  if (group->eps() != unset.eps()) o.eps(group->eps());
  if (group->maximize() != unset.maximize()) o.maximize(group->maximize());
  if (group->eps_inside_sqrt() != unset.eps_inside_sqrt()) {
    o.eps_inside_sqrt(group->eps_inside_sqrt());
  }
  return o;
}

// The inputs of one group's op call: every param of the group, in order, so that error messages
// name the param's index in its group; a param without grad is passed with grad None.
struct GroupInputs {
  std::vector<at::Tensor> params, sums, steps;
  OptionalTensorList grads;
};

}  // namespace

FusedAdagrad::FusedAdagrad(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                           FusedAdagradOptions defaults)
    : Optimizer(param_groups, std::make_unique<FusedAdagradOptions>(defaults)) {
  check_options(defaults);
  // The base constructor went through Optimizer::add_param_group, which dropped group options.
  for (size_t g = 0; g < param_groups.size(); ++g) {
    if (param_groups[g].has_options()) {
      param_groups_[g].set_options(std::make_unique<FusedAdagradOptions>(
          merge_group_options(*defaults_, param_groups[g].options())));
    }
  }
  for (const auto& group : param_groups_) {
    const auto& options = static_cast<const FusedAdagradOptions&>(group.options());
    check_options(options);
    for (const auto& p : group.params()) state_for(p, options);
  }
}

void FusedAdagrad::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  std::optional<FusedAdagradOptions> options;
  if (param_group.has_options()) {
    options = merge_group_options(*defaults_, param_group.options());
    check_options(*options);
  }
  Optimizer::add_param_group(param_group);  // checks the params; gives the group the defaults
  if (options) param_groups_.back().set_options(std::make_unique<FusedAdagradOptions>(*options));
}

FusedAdagradParamState& FusedAdagrad::state_for(const torch::Tensor& p,
                                                const FusedAdagradOptions& options) {
  auto it = state_.find(p.unsafeGetTensorImpl());
  if (it == state_.end()) {
    auto state = std::make_unique<FusedAdagradParamState>();
    // Step lives with the param on accelerators, so a CUDA step needs no host synchronization.
    const auto step_device = p.device().is_cpu() ? torch::Device(torch::kCPU) : p.device();
    state->step(torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(step_device)));
    state->sum(torch::full_like(p.detach(), options.initial_accumulator_value(),
                                at::MemoryFormat::Preserve));
    if (p.is_complex()) {
      // complex(v, v), as torch.optim.Adagrad initializes complex params.
      torch::NoGradGuard no_grad;
      torch::view_as_real(state->sum()).fill_(options.initial_accumulator_value());
    }
    it = state_.emplace(p.unsafeGetTensorImpl(), std::move(state)).first;
  }
  return static_cast<FusedAdagradParamState&>(*it->second);
}

torch::Tensor FusedAdagrad::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }

  std::vector<GroupInputs> inputs(param_groups_.size());
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& options = static_cast<const FusedAdagradOptions&>(param_groups_[g].options());
    check_options(options);
    GroupInputs& in = inputs[g];
    for (const auto& p : param_groups_[g].params()) {
      auto& state = state_for(p, options);
      in.params.push_back(p);
      in.grads.push_back(p.grad().defined() ? std::optional<at::Tensor>(p.grad()) : std::nullopt);
      in.sums.push_back(state.sum());
      in.steps.push_back(state.step());
    }
    try {
      check_adagrad_inputs(in.params, in.grads, in.sums, in.steps, options.weight_decay());
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "FusedAdagrad: param group ", g, ", ", e.what_without_backtrace());
    }
  }
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& o = static_cast<const FusedAdagradOptions&>(param_groups_[g].options());
    GroupInputs& in = inputs[g];
    adagrad_step_(in.params, in.grads, in.sums, in.steps, o.lr(), o.lr_decay(), o.weight_decay(),
                  o.eps(), o.maximize(), o.eps_inside_sqrt());
  }
  return loss;
}

void FusedAdagrad::save(torch::serialize::OutputArchive& archive) const { serialize(*this, archive); }

void FusedAdagrad::load(torch::serialize::InputArchive& archive) { serialize(*this, archive); }

}  // namespace fused_adagrad
