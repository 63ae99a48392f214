// fused_adagrad::FusedAdagrad, the LibTorch optimizer. Its arithmetic is the adagrad_step_ op;
// what it shares with RowWiseAdagrad is in optimizer_common.h.
#include "fused_adagrad/fused_adagrad.h"
#include "optimizer_common.h"

namespace fused_adagrad {

namespace common = optimizer_common;

FusedAdagradOptions::FusedAdagradOptions(double lr) : lr_(lr) {}

bool operator==(const FusedAdagradOptions& lhs, const FusedAdagradOptions& rhs) {
  return common::options_equal(lhs, rhs);
}

void FusedAdagradOptions::serialize(torch::serialize::OutputArchive& archive) const {
  common::write_options(*this, archive);
}

void FusedAdagradOptions::serialize(torch::serialize::InputArchive& archive) {
  common::read_options(*this, archive);
}

double FusedAdagradOptions::get_lr() const { return lr(); }
void FusedAdagradOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const FusedAdagradParamState& lhs, const FusedAdagradParamState& rhs) {
  return common::states_equal(lhs, rhs);
}

void FusedAdagradParamState::serialize(torch::serialize::OutputArchive& archive) const {
  common::write_state(*this, archive);
}

void FusedAdagradParamState::serialize(torch::serialize::InputArchive& archive) {
  common::read_state(*this, archive);
}

namespace {
constexpr const char* kName = "FusedAdagrad";
}  // namespace

FusedAdagrad::FusedAdagrad(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                           FusedAdagradOptions defaults)
    : Optimizer(param_groups, std::make_unique<FusedAdagradOptions>(defaults)) {
  common::init_param_groups<FusedAdagradOptions>(
      kName, *this, param_groups,
      [this](const torch::Tensor& p, const FusedAdagradOptions& o) { state_for(p, o); });
}

void FusedAdagrad::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  common::add_param_group<FusedAdagradOptions>(kName, *this, param_group);
}

FusedAdagradParamState& FusedAdagrad::state_for(const torch::Tensor& p,
                                                const FusedAdagradOptions& options) {
  const double initial = options.initial_accumulator_value();
  return common::find_or_create_state<FusedAdagradParamState>(
      *this, p, [initial](const torch::Tensor& param) {
        return common::filled_state(torch::empty_like(param, at::MemoryFormat::Preserve), initial);
      });
}

torch::Tensor FusedAdagrad::step(LossClosure closure) { return step_with(closure, {}); }

void FusedAdagrad::step(const GradScaling& scaling) { step_with(nullptr, scaling); }

torch::Tensor FusedAdagrad::step_with(const LossClosure& closure, const GradScaling& scaling) {
  auto state = [this](const torch::Tensor& p, const FusedAdagradOptions& o) -> auto& {
    return state_for(p, o);
  };
  return common::step_param_groups<FusedAdagradOptions>(kName, *this, closure, /*rowwise=*/false,
                                                        state, scaling);
}

// torch::optim::Adagrad's layout and int64 steps, so that it loads ours (see the header).
void FusedAdagrad::save(torch::serialize::OutputArchive& archive) const {
  common::save_optimizer<FusedAdagradOptions, FusedAdagradParamState>(kName, *this, archive,
                                                                      /*int64_steps=*/true);
}

// Ours and torch::optim::Adagrad's (which name no writer).
void FusedAdagrad::load(torch::serialize::InputArchive& archive) {
  common::load_optimizer<FusedAdagradOptions, FusedAdagradParamState>(
      kName, *this, archive, Variant::Elementwise, /*accepts_unnamed=*/true);
}

}  // namespace fused_adagrad
