// What FusedAdagrad and RowWiseAdagrad share: their options (the same fields, checks and group
// merging), state lookup, and the step that validates every group before stepping any. Internal
// to the library (not installed): the optimizers differ only in their state's sum and their op.
#pragma once

#include "fused_adagrad/fused_adagrad.h"
#include "plan.h"

#include <torch/autograd.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
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

// Reads our options and torch::optim::AdagradOptions' (the same names, less maximize and
// eps_inside_sqrt: torch's Adagrad does neither, so both are false). Types are checked here, as
// IValue::to would only fail an internal assert on a corrupt archive.
template <typename Options>
void read_options(Options& options, torch::serialize::InputArchive& archive) {
  c10::IValue probe;
  const bool torch_layout =
      !archive.try_read("maximize", probe) && !archive.try_read("eps_inside_sqrt", probe);
  for_each_option(
      [&](const char* name, auto& v) {
        using T = std::decay_t<decltype(v)>;
        c10::IValue ivalue;
        if (!archive.try_read(name, ivalue)) {
          TORCH_CHECK((torch_layout && std::is_same_v<T, bool>), "optimizer options: '", name,
                      "' missing from the archive");
          v = T{};
          return;
        }
        if constexpr (std::is_same_v<T, bool>) {
          TORCH_CHECK(ivalue.isBool(), "optimizer options: '", name, "' must be a bool, got ",
                      ivalue.tagKind());
        } else {
          TORCH_CHECK(ivalue.isDouble(), "optimizer options: '", name, "' must be a float, got ",
                      ivalue.tagKind());
        }
        v = ivalue.to<T>();
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

// A step saved as torch::optim::AdagradParamState's int64 becomes a CPU float32 0-d tensor (the
// optimizers' load puts it on the param's device; this has no param).
template <typename State>
void read_state(State& state, torch::serialize::InputArchive& archive) {
  c10::IValue ivalue;
  if (archive.try_read("sum", ivalue)) state.sum(ivalue.toTensor());
  if (archive.try_read("step", ivalue)) {
    state.step(ivalue.isInt() ? torch::full({}, static_cast<float>(ivalue.toInt()), torch::kFloat)
                              : ivalue.toTensor());
  }
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

// Where the optimizers keep the step of `p`: on its device, the CPU for CPU params.
inline torch::Device step_device(const torch::Tensor& p) {
  return p.device().is_cpu() ? torch::Device(torch::kCPU) : p.device();
}

// `empty` (fresh from at::empty, not yet written) filled with `value`, on huge pages where it
// holds whole ones (advise_huge_pages); complex(value, value) for complex tensors, as
// torch.optim.Adagrad initializes them.
inline torch::Tensor filled_state(torch::Tensor empty, double value) {
  advise_huge_pages(empty);
  (empty.is_complex() ? torch::view_as_real(empty) : empty).fill_(value);
  return empty;
}

// `t` copied onto huge pages, for a state loaded from a checkpoint (torch allocated it, without
// the advice); t itself where the advice cannot be taken (not on the CPU, no whole 2 MiB page,
// THP off).
inline torch::Tensor on_huge_pages(const torch::Tensor& t) {
  if (!t.is_cpu() || t.nbytes() < (size_t{2} << 20)) return t;
  torch::Tensor copy = torch::empty_like(t, at::MemoryFormat::Preserve);
  return advise_huge_pages(copy) ? copy.copy_(t) : t;
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
    state->step(
        torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(step_device(p))));
    state->sum(make_sum(p.detach()));
    it = states.emplace(p.unsafeGetTensorImpl(), std::move(state)).first;
  }
  return static_cast<State&>(*it->second);
}

// ---- checkpoints ---------------------------------------------------------------------------
// Archives have torch::optim's layout (torch/optim/serialize.h), which torch::optim::Adagrad
// writes and reads:
//   pytorch_version                   "1.5.0"
//   state/<key>/{step, sum}           <key>: a TensorImpl address of the saving process
//   param_groups/param_groups/size    a tensor
//   param_groups/param_groups/<i>/{params/size, params/<j> (a state <key>), options/<name>}
// and ours add kWriterKey, the optimizer that wrote it (torch's loader ignores it).
inline constexpr const char* kArchiveVersion = "1.5.0";
inline constexpr const char* kWriterKey = "fused_adagrad_optimizer";

inline std::string state_key(const void* impl) {
  return std::to_string(reinterpret_cast<size_t>(impl));
}

// Whether loading `step` back from an int64 (load_optimizer: a 0-d float32 on step_device)
// restores it exactly: then it can be written as torch's int64 step.
inline bool int64_restores(const torch::Tensor& step, const torch::Tensor* param) {
  if (param == nullptr || !step.defined() || step.dim() != 0 ||
      step.scalar_type() != torch::kFloat || step.layout() != torch::kStrided ||
      step.device() != step_device(*param) || step.is_meta()) {
    return false;
  }
  const float v = step.item<float>();
  return v >= 0 && std::floor(v) == v && v < 9.2e18f;  // an integer within int64
}

// `int64_steps`: write each step that int64_restores as an int64, as torch's Adagrad does.
template <typename Options, typename State>
void save_optimizer(const char* name, const torch::optim::Optimizer& opt,
                    torch::serialize::OutputArchive& archive, bool int64_steps) {
  archive.write("pytorch_version", c10::IValue(kArchiveVersion));
  archive.write(kWriterKey, c10::IValue(name));

  std::unordered_map<const void*, const torch::Tensor*> params;
  for (const auto& group : opt.param_groups()) {
    for (const auto& p : group.params()) params.emplace(p.unsafeGetTensorImpl(), &p);
  }
  torch::serialize::OutputArchive states(archive.compilation_unit());
  for (const auto& [impl, base] : opt.state()) {
    const auto& state = static_cast<const State&>(*base);
    const auto it = params.find(impl);
    const torch::Tensor& step = state.step();
    torch::serialize::OutputArchive entry(archive.compilation_unit());
    if (int64_steps && int64_restores(step, it == params.end() ? nullptr : it->second)) {
      entry.write("step", c10::IValue(static_cast<int64_t>(step.item<float>())));
    } else if (step.defined()) {
      entry.write("step", c10::IValue(step));
    }
    if (state.sum().defined()) entry.write("sum", c10::IValue(state.sum()));
    states.write(state_key(impl), entry);
  }
  archive.write("state", states);

  // torch's own writer of the groups, so that its reader finds them where it looks.
  torch::serialize::OutputArchive groups(archive.compilation_unit());
  torch::optim::detail::serialize<Options>(groups, opt.param_groups());
  archive.write("param_groups", groups);
}

namespace detail {

inline int64_t read_count(torch::serialize::InputArchive& archive, const std::string& key) {
  torch::Tensor t;
  TORCH_CHECK(archive.try_read(key, t), "'", key, "' is missing or not a tensor");
  TORCH_CHECK(t.numel() == 1 && c10::isIntegralType(t.scalar_type(), /*includeBool=*/false),
              "'", key, "' is not a count");
  const int64_t n = t.item<int64_t>();
  TORCH_CHECK(n >= 0, "'", key, "' is ", n);
  return n;
}

// check_metadata's message names the param by its index in the list, here always "param 0: ".
inline std::string without_index(const c10::Error& e) {
  std::string msg = e.what_without_backtrace();
  const std::string prefix = "param 0: ";
  return msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg;
}

}  // namespace detail

// Optimizer::load for both. `variant`: the state the optimizer steps with, checked as a step
// would check it. `accepts_unnamed`: whether an archive without kWriterKey is taken (torch's,
// or ours from before it was written), else only one written by `name`. Everything is read into
// temporaries and checked first; only then are states and options replaced, so an archive that
// raises changes nothing.
template <typename Options, typename State>
void load_optimizer(const char* name, torch::optim::Optimizer& opt,
                    torch::serialize::InputArchive& archive, Variant variant,
                    bool accepts_unnamed) {
  struct Loaded {
    void* impl;
    std::unique_ptr<State> state;  // null: the archive has no state for this param
  };
  std::vector<Loaded> loaded;
  std::vector<std::unique_ptr<Options>> group_options;
  try {
    c10::IValue writer;
    if (archive.try_read(kWriterKey, writer)) {
      TORCH_CHECK(writer.isString(), "'", kWriterKey, "' is not a string");
      TORCH_CHECK(writer.toStringRef() == name, "it was written by ", writer.toStringRef(),
                  ", whose state does not load into ", name);
    } else {
      TORCH_CHECK(accepts_unnamed, "it was not written by ", name,
                  " (no '", kWriterKey, "' entry): it is torch::optim::Adagrad's or "
                  "FusedAdagrad's, whose element-wise state does not load into ", name);
    }
    c10::IValue version;
    TORCH_CHECK(archive.try_read("pytorch_version", version),
                "no 'pytorch_version' entry: not an optimizer archive of torch::optim's layout "
                "(torch 1.5 and later)");
    TORCH_CHECK(version.isString() && version.toStringRef() == kArchiveVersion,
                "'pytorch_version' is ",
                version.isString() ? version.toStringRef() : version.tagKind(), ", not ",
                kArchiveVersion, " (the only layout torch::optim writes)");

    struct Saved {
      torch::Tensor sum;
      c10::IValue step;  // an int64 (torch's) or a tensor (ours)
    };
    std::unordered_map<std::string, Saved> saved;
    torch::serialize::InputArchive states;
    TORCH_CHECK(archive.try_read("state", states), "'state' is missing");
    for (const std::string& key : states.keys()) {
      torch::serialize::InputArchive entry;
      TORCH_CHECK(states.try_read(key, entry), "state '", key, "' is not a param's state");
      c10::IValue sum, step;
      TORCH_CHECK(entry.try_read("sum", sum) && sum.isTensor(), "state '", key,
                  "': 'sum' is missing or not a tensor");
      TORCH_CHECK(entry.try_read("step", step) && (step.isInt() || step.isTensor()), "state '",
                  key, "': 'step' is missing or neither an int nor a tensor");
      saved.emplace(key, Saved{sum.toTensor(), step});
    }

    torch::serialize::InputArchive groups;
    TORCH_CHECK(archive.try_read("param_groups", groups), "'param_groups' is missing");
    auto& own_groups = opt.param_groups();
    const int64_t n_groups = detail::read_count(groups, "param_groups/size");
    TORCH_CHECK(n_groups == static_cast<int64_t>(own_groups.size()), "it has ", n_groups,
                " param groups, the optimizer ", own_groups.size());
    std::unordered_set<std::string> seen;
    for (int64_t g = 0; g < n_groups; ++g) {
      const std::string where = "param group " + std::to_string(g);
      torch::serialize::InputArchive group;
      TORCH_CHECK(groups.try_read("param_groups/" + std::to_string(g), group), where,
                  " is missing");
      const auto& params = own_groups[g].params();
      const int64_t n_params = detail::read_count(group, "params/size");
      TORCH_CHECK(n_params == static_cast<int64_t>(params.size()), where, " has ", n_params,
                  " params, the optimizer's ", params.size());

      torch::serialize::InputArchive options_archive;
      TORCH_CHECK(group.try_read("options", options_archive), where, ": 'options' is missing");
      auto options = std::make_unique<Options>(0);
      try {
        options->serialize(options_archive);
        check_options(*options);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, where, ": ", e.what_without_backtrace());
      }
      group_options.push_back(std::move(options));

      for (int64_t j = 0; j < n_params; ++j) {
        const std::string param_where = where + ", param " + std::to_string(j);
        c10::IValue key;
        TORCH_CHECK(group.try_read("params/" + std::to_string(j), key) && key.isString(),
                    param_where, ": its state key is missing");
        TORCH_CHECK(seen.insert(key.toStringRef()).second, param_where,
                    ": its state key is another param's too");
        const torch::Tensor& p = params[j];
        Loaded entry{p.unsafeGetTensorImpl(), nullptr};
        const auto it = saved.find(key.toStringRef());
        if (it != saved.end()) {
          // Tensors saved on another device (or loaded onto one) go where a step needs them.
          torch::Tensor sum = it->second.sum;
          if (sum.device() != p.device()) sum = sum.to(p.device());
          torch::Tensor step;
          if (it->second.step.isInt()) {
            const int64_t count = it->second.step.toInt();
            TORCH_CHECK(count >= 0, param_where, ": 'step' is ", count);
            step = torch::full({}, static_cast<float>(count),
                               torch::TensorOptions().dtype(torch::kFloat).device(step_device(p)));
          } else {
            step = it->second.step.toTensor();
            if (!step.device().is_cpu() && step.device() != p.device()) {
              step = step.to(step_device(p));
            }
          }
          try {
            const std::vector<std::optional<at::Tensor>> no_grad{std::nullopt};
            check_metadata(variant, {p}, no_grad, {sum}, {step}, /*weight_decay=*/0,
                           std::nullopt);
          } catch (const c10::Error& e) {
            TORCH_CHECK(false, param_where, ": ", detail::without_index(e));
          }
          entry.state = std::make_unique<State>();
          entry.state->sum(std::move(sum));
          entry.state->step(std::move(step));
        }
        loaded.push_back(std::move(entry));
      }
    }
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, name, "::load: cannot load the archive, the optimizer is unchanged: ",
                e.what_without_backtrace());
  }

  // Commit. A param the archive has no state for (one its optimizer never stepped) loses its
  // own: it gets fresh state at the next step, as it would have in the saving optimizer. Sums
  // move onto huge pages as created ones are, one at a time (the archive's copies are gone).
  auto& states = opt.state();
  states.reserve(states.size() + loaded.size());
  for (auto& entry : loaded) {
    if (entry.state) {
      entry.state->sum(on_huge_pages(entry.state->sum()));
      states[entry.impl] = std::move(entry.state);
    } else {
      states.erase(entry.impl);
    }
  }
  auto& own_groups = opt.param_groups();
  for (size_t g = 0; g < group_options.size(); ++g) {
    own_groups[g].set_options(std::move(group_options[g]));
  }
}

// Optimizer::step for both: runs the closure, then steps every group in one call of
// adagrad_step_groups_, which validates all of them before it changes any, so a step that throws
// changes no param and no state. A param without grad is passed with grad None, so errors name
// the group and the param's index in it.
template <typename Options, typename StateFor>
torch::Tensor step_param_groups(const char* name, torch::optim::Optimizer& opt,
                                const torch::optim::Optimizer::LossClosure& closure,
                                bool rowwise, StateFor&& state_for,
                                const GradScaling& scaling = {}) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }

  std::vector<at::Tensor> params, sums, steps;
  OptionalTensorList grads, lr_tensors;
  std::vector<int64_t> sizes;
  std::vector<double> lr, lr_decay, weight_decay, eps;
  c10::List<bool> maximize, eps_inside_sqrt;
  for (const auto& group : opt.param_groups()) {
    const auto& options = static_cast<const Options&>(group.options());
    check_options(options);
    for (const auto& p : group.params()) {
      auto& state = state_for(p, options);
      params.push_back(p);
      grads.push_back(p.grad().defined() ? std::optional<at::Tensor>(p.grad()) : std::nullopt);
      sums.push_back(state.sum());
      steps.push_back(state.step());
    }
    sizes.push_back(static_cast<int64_t>(group.params().size()));
    lr.push_back(options.lr());
    lr_decay.push_back(options.lr_decay());
    weight_decay.push_back(options.weight_decay());
    eps.push_back(options.eps());
    maximize.push_back(options.maximize());
    eps_inside_sqrt.push_back(options.eps_inside_sqrt());
    lr_tensors.push_back(std::nullopt);
  }
  try {
    adagrad_step_groups_(params, grads, sums, steps, sizes, lr, lr_decay, weight_decay, eps,
                         maximize, eps_inside_sqrt, lr_tensors, rowwise, scaling.grad_scale,
                         scaling.found_inf);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, name, ": ", e.what_without_backtrace());
  }
  return loss;
}

}  // namespace fused_adagrad::optimizer_common
