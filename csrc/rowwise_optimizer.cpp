// fused_adagrad::RowWiseAdagrad, the LibTorch optimizer of the rowwise_adagrad_step_ op. It is
// FusedAdagrad (optimizer_common.h) with one accumulator per row of dim 0.
#include "fused_adagrad/fused_adagrad.h"
#include "optimizer_common.h"
#include "plan.h"

namespace fused_adagrad {

namespace common = optimizer_common;

RowWiseAdagradOptions::RowWiseAdagradOptions(double lr) : lr_(lr) {}

bool operator==(const RowWiseAdagradOptions& lhs, const RowWiseAdagradOptions& rhs) {
  return common::options_equal(lhs, rhs);
}

void RowWiseAdagradOptions::serialize(torch::serialize::OutputArchive& archive) const {
  common::write_options(*this, archive);
}

void RowWiseAdagradOptions::serialize(torch::serialize::InputArchive& archive) {
  common::read_options(*this, archive);
}

double RowWiseAdagradOptions::get_lr() const { return lr(); }
void RowWiseAdagradOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const RowWiseAdagradParamState& lhs, const RowWiseAdagradParamState& rhs) {
  return common::states_equal(lhs, rhs);
}

void RowWiseAdagradParamState::serialize(torch::serialize::OutputArchive& archive) const {
  common::write_state(*this, archive);
}

void RowWiseAdagradParamState::serialize(torch::serialize::InputArchive& archive) {
  common::read_state(*this, archive);
}

namespace {
constexpr const char* kName = "RowWiseAdagrad";
}  // namespace

RowWiseAdagrad::RowWiseAdagrad(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                               RowWiseAdagradOptions defaults)
    : Optimizer(param_groups, std::make_unique<RowWiseAdagradOptions>(defaults)) {
  common::init_param_groups<RowWiseAdagradOptions>(
      kName, *this, param_groups,
      [this](const torch::Tensor& p, const RowWiseAdagradOptions& o) { state_for(p, o); });
}

void RowWiseAdagrad::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  common::add_param_group<RowWiseAdagradOptions>(kName, *this, param_group);
}

RowWiseAdagradParamState& RowWiseAdagrad::state_for(const torch::Tensor& p,
                                                    const RowWiseAdagradOptions& options) {
  const double initial = options.initial_accumulator_value();
  return common::find_or_create_state<RowWiseAdagradParamState>(
      *this, p, [initial](const torch::Tensor& param) {
        TORCH_CHECK(!param.is_complex(), "RowWiseAdagrad does not support complex parameters");
        // The shape and dtype the op checks for.
        return common::filled_state(
            torch::empty(rowwise_sum_shape(param), torch::TensorOptions()
                                                       .dtype(rowwise_sum_dtype(param.scalar_type()))
                                                       .device(param.device())),
            initial);
      });
}

torch::Tensor RowWiseAdagrad::step(LossClosure closure) { return step_with(closure, {}); }

void RowWiseAdagrad::step(const GradScaling& scaling) { step_with(nullptr, scaling); }

torch::Tensor RowWiseAdagrad::step_with(const LossClosure& closure, const GradScaling& scaling) {
  auto state = [this](const torch::Tensor& p, const RowWiseAdagradOptions& o) -> auto& {
    return state_for(p, o);
  };
  return common::step_param_groups<RowWiseAdagradOptions>(kName, *this, closure, /*rowwise=*/true,
                                                          state, scaling);
}

// Tensor steps: torch::optim::Adagrad then refuses the archive instead of taking row-wise sums
// for its element-wise ones.
void RowWiseAdagrad::save(torch::serialize::OutputArchive& archive) const {
  common::save_optimizer<RowWiseAdagradOptions, RowWiseAdagradParamState>(
      kName, *this, archive, /*int64_steps=*/false);
}

// Only archives naming RowWiseAdagrad: an element-wise sum of a 1-d param has the shape of a
// row-wise one, so the shapes alone would not tell a FusedAdagrad or torch archive apart.
void RowWiseAdagrad::load(torch::serialize::InputArchive& archive) {
  common::load_optimizer<RowWiseAdagradOptions, RowWiseAdagradParamState>(
      kName, *this, archive, Variant::RowWise, /*accepts_unnamed=*/false);
}

}  // namespace fused_adagrad
