// What FusedAdagrad and RowWiseAdagrad share: their options (the same fields, checks and group
// merging), state lookup, and the step that validates every group before stepping any. Internal
// to the library (not installed): the optimizers differ only in their state's sum and their op.
#pragma once

#include "fused_adagrad/fused_adagrad.h"

#include <torch/autograd.h>
#include <torch/serialize/archive.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fused_adagrad::optimizer_common {

// Calls fn(name, field of each options object...) for every option, in serialization order.
// One list of the fields keeps ==, (de)serialization and group merging in step with the structs.
template <typename Fn, typename... Options>
void for_each_option(Fn&& fn, Options&... options) {
  fn("lr", options.lr()...);
  fn("lr_decay", options.lr_decay()...);
  fn("weight_decay", options.weight_decay()...);
  fn("initial_accumulator_value", options.initial_accumulator_value()...);
  fn("eps", options.eps()...);
  fn("maximize", options.maximize()...);
  fn("eps_inside_sqrt", options.eps_inside_sqrt()...);
}

template <typename Options>
bool options_equal(const Options& lhs, const Options& rhs) {
  bool equal = true;
  for_each_option([&](const char*, const auto& a, const auto& b) { equal = equal && a == b; },
                  lhs, rhs);
  return equal;
}

template <typename Options>
void write_options(const Options& options, torch::serialize::OutputArchive& archive) {
  for_each_option([&](const char* name, const auto& v) { archive.write(name, c10::IValue(v)); },
                  options);
}

template <typename Options>
void read_options(Options& options, torch::serialize::InputArchive& archive) {
  for_each_option(
      [&](const char* name, auto& v) {
        c10::IValue ivalue;
        TORCH_CHECK(archive.try_read(name, ivalue), "optimizer options: '", name,
                    "' missing from the archive");
        v = ivalue.to<std::decay_t<decltype(v)>>();
      },
      options);
}

// The state structs hold `sum` and `step`; an undefined tensor is not written (as torch's
// _TORCH_OPTIM_SERIALIZE_TORCH_ARG), and one missing from the archive is left as it is.
template <typename State>
bool states_equal(const State& lhs, const State& rhs) {
  return torch::equal(lhs.sum(), rhs.sum()) && torch::equal(lhs.step(), rhs.step());
}

template <typename State>
void write_state(const State& state, torch::serialize::OutputArchive& archive) {
  // As IValues (attributes), not archive.write(key, Tensor) (parameters), which try_read(IValue)
  // would not find.
  if (state.sum().defined()) archive.write("sum", c10::IValue(state.sum()));
  if (state.step().defined()) archive.write("step", c10::IValue(state.step()));
}

template <typename State>
void read_state(State& state, torch::serialize::InputArchive& archive) {
  c10::IValue ivalue;
  if (archive.try_read("sum", ivalue)) state.sum(ivalue.toTensor());
  if (archive.try_read("step", ivalue)) state.step(ivalue.toTensor());
}

// torch::optim::Adagrad's messages, word for word.
template <typename Options>
void check_options(const Options& o) {
  TORCH_CHECK(o.lr() >= 0, "Invalid learning rate: ", o.lr());
  TORCH_CHECK(o.lr_decay() >= 0, "Invalid lr_decay value: ", o.lr_decay());
  TORCH_CHECK(o.weight_decay() >= 0, "Invalid weight_decay value: ", o.weight_decay());
  TORCH_CHECK(o.initial_accumulator_value() >= 0, "Invalid initial_accumulator_value value: ",
              o.initial_accumulator_value());
  TORCH_CHECK(o.eps() >= 0, "Invalid epsilon value: ", o.eps());
}

// A group's options as recent torch (2.13) resolves them for torch::optim::Adagrad: a field
// left at its Options() value takes the optimizer's default, like a key missing from a Python
// param group. `name` is the optimizer's, for the error.
template <typename Options>
Options merge_group_options(const char* name, const torch::optim::OptimizerOptions& defaults,
                            const torch::optim::OptimizerOptions& group_base) {
  const auto* group = dynamic_cast<const Options*>(&group_base);
  TORCH_CHECK(group != nullptr, name, ": param group options must be ", name, "Options");
  Options merged = static_cast<const Options&>(defaults);
  const Options unset;
  for_each_option(
      [](const char*, auto& out, const auto& given, const auto& unset_value) {
        if (given != unset_value) out = given;
      },
      merged, *group, unset);
  return merged;
}

// The constructor's work after Optimizer's: Optimizer::add_param_group dropped the groups'
// options, so they are merged back; then every group is checked and its params get state.
template <typename Options, typename StateFor>
void init_param_groups(const char* name, torch::optim::Optimizer& opt,
                       const std::vector<torch::optim::OptimizerParamGroup>& given,
                       StateFor&& state_for) {
  check_options(static_cast<const Options&>(opt.defaults()));
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < given.size(); ++g) {
    if (given[g].has_options()) {
      groups[g].set_options(std::make_unique<Options>(
          merge_group_options<Options>(name, opt.defaults(), given[g].options())));
    }
  }
  for (const auto& group : groups) {
    const auto& options = static_cast<const Options&>(group.options());
    check_options(options);
    for (const auto& p : group.params()) state_for(p, options);
  }
}

// Optimizer::add_param_group with the group's own (merged, checked) options instead of the
// defaults; invalid options are refused before the group is added.
template <typename Options>
void add_param_group(const char* name, torch::optim::Optimizer& opt,
                     const torch::optim::OptimizerParamGroup& param_group) {
  std::optional<Options> options;
  if (param_group.has_options()) {
    options = merge_group_options<Options>(name, opt.defaults(), param_group.options());
    check_options(*options);
  }
  opt.add_param_group(param_group);  // Optimizer's (not virtual): checks the params
  if (options) opt.param_groups().back().set_options(std::make_unique<Options>(*options));
}

// The state of `p`, created when it has none: `step` a 0-d float32 tensor, on the param's
// device for accelerators (so a CUDA step needs no host synchronization), and the sum that
// make_sum(p) returns.
template <typename State, typename MakeSum>
State& find_or_create_state(torch::optim::Optimizer& opt, const torch::Tensor& p,
                            MakeSum&& make_sum) {
  auto& states = opt.state();
  auto it = states.find(p.unsafeGetTensorImpl());
  if (it == states.end()) {
    torch::NoGradGuard no_grad;
    auto state = std::make_unique<State>();
    const auto step_device = p.device().is_cpu() ? torch::Device(torch::kCPU) : p.device();
    state->step(torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(step_device)));
    state->sum(make_sum(p.detach()));
    it = states.emplace(p.unsafeGetTensorImpl(), std::move(state)).first;
  }
  return static_cast<State&>(*it->second);
}

// adagrad_step_ and rowwise_adagrad_step_.
using StepOp = void (*)(at::TensorList, const OptionalTensorList&, at::TensorList, at::TensorList,
                        double, double, double, double, bool, bool,
                        const std::optional<at::Tensor>&);

// Optimizer::step for both: runs the closure, then validates every group (check_adagrad_inputs)
// before `op` steps any, so a step that throws changes no param and no state. Each group is
// passed whole, in order, so errors name the param's index in its group; a param without grad
// is passed with grad None.
template <typename Options, typename StateFor>
torch::Tensor step_param_groups(const char* name, torch::optim::Optimizer& opt,
                                const torch::optim::Optimizer::LossClosure& closure,
                                bool rowwise, StepOp op, StateFor&& state_for) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }

  struct GroupInputs {
    std::vector<at::Tensor> params, sums, steps;
    OptionalTensorList grads;
  };
  auto& groups = opt.param_groups();
  std::vector<GroupInputs> inputs(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& options = static_cast<const Options&>(groups[g].options());
    check_options(options);
    GroupInputs& in = inputs[g];
    for (const auto& p : groups[g].params()) {
      auto& state = state_for(p, options);
      in.params.push_back(p);
      in.grads.push_back(p.grad().defined() ? std::optional<at::Tensor>(p.grad()) : std::nullopt);
      in.sums.push_back(state.sum());
      in.steps.push_back(state.step());
    }
    try {
      check_adagrad_inputs(in.params, in.grads, in.sums, in.steps, options.weight_decay(),
                           rowwise);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, name, ": param group ", g, ", ", e.what_without_backtrace());
    }
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& o = static_cast<const Options&>(groups[g].options());
    GroupInputs& in = inputs[g];
    op(in.params, in.grads, in.sums, in.steps, o.lr(), o.lr_decay(), o.weight_decay(), o.eps(),
       o.maximize(), o.eps_inside_sqrt(), std::nullopt);
  }
  return loss;
}

}  // namespace fused_adagrad::optimizer_common
