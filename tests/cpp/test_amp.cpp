// Loss scaling from C++: GradScaling through the optimizers' step(const GradScaling&) and the raw
// op's grad_scale / found_inf arguments.
#include "test_util.h"

namespace fused_adagrad::testing {
namespace {

struct Model {
  torch::Tensor weight = torch::randn({7, 5}).requires_grad_();
  torch::Tensor bias = torch::randn({7}).requires_grad_();
  std::vector<torch::Tensor> params() const { return {weight, bias}; }
  // Grads as a GradScaler would leave them: the loss's grads times `scale`.
  void set_grads(double scale) {
    torch::NoGradGuard no_grad;
    weight.mutable_grad() = torch::randn({7, 5}) * scale;
    bias.mutable_grad() = torch::randn({7}) * scale;
  }
};

template <typename Optimizer, typename Options>
void expect_scaled_step_equals_unscaled_step(Options options) {
  torch::manual_seed(0);
  Model scaled, plain;
  {
    torch::NoGradGuard no_grad;
    plain.weight.copy_(scaled.weight);
    plain.bias.copy_(scaled.bias);
  }
  Optimizer scaled_opt(scaled.params(), options), plain_opt(plain.params(), options);
  const torch::Tensor scale = torch::full({}, 1024.0f);
  for (int i = 0; i < 4; ++i) {
    torch::manual_seed(100 + i);
    scaled.set_grads(1024.0);
    torch::manual_seed(100 + i);
    plain.set_grads(1.0);
    const bool skip = i == 2;
    const auto before = clones({scaled.weight.detach(), scaled.bias.detach()});
    scaled_opt.step(GradScaling{scale, torch::full({}, skip ? 1.0f : 0.0f)});
    if (skip) {  // nothing changed; the unscaled optimizer skips the step too
      EXPECT_TRUE(torch::equal(scaled.weight, before[0]));
      EXPECT_TRUE(torch::equal(scaled.bias, before[1]));
      continue;
    }
    plain_opt.step();
    EXPECT_TRUE(torch::equal(scaled.weight, plain.weight));
    EXPECT_TRUE(torch::equal(scaled.bias, plain.bias));
    // The unscaled grad is left in .grad, as torch's fused=True leaves it.
    EXPECT_TRUE(torch::allclose(scaled.weight.grad(), plain.weight.grad(), 0, 0));
  }
}

TEST(Amp, FusedAdagradScaledStepEqualsStepOnUnscaledGrads) {
  expect_scaled_step_equals_unscaled_step<FusedAdagrad>(FusedAdagradOptions(0.1).lr_decay(0.01));
}

TEST(Amp, RowWiseAdagradScaledStepEqualsStepOnUnscaledGrads) {
  expect_scaled_step_equals_unscaled_step<RowWiseAdagrad>(RowWiseAdagradOptions(0.1).weight_decay(0.1));
}

TEST(Amp, SkippedStepDoesNotCountTheStep) {
  Model m;
  m.set_grads(8.0);
  FusedAdagrad opt(m.params(), FusedAdagradOptions(0.1));
  opt.step(GradScaling{torch::full({}, 8.0f), torch::full({}, 1.0f)});
  opt.step(GradScaling{std::nullopt, torch::full({}, 0.0f)});  // grads already unscaled
  const auto& state = static_cast<const FusedAdagradParamState&>(
      *opt.state().at(m.weight.unsafeGetTensorImpl()));
  EXPECT_EQ(state.step().item<float>(), 1.0f);
}

TEST(Amp, RawOpRefusesBadScalingTensorsAndChangesNothing) {
  Model m;
  m.set_grads(4.0);
  std::vector<torch::Tensor> params{m.weight.detach(), m.bias.detach()};
  OptionalTensorList grads, lr_tensors;
  grads.push_back(m.weight.grad());
  grads.push_back(m.bias.grad());
  lr_tensors.push_back(std::nullopt);
  std::vector<torch::Tensor> sums{torch::zeros({7, 5}), torch::zeros({7})};
  std::vector<torch::Tensor> steps{torch::zeros({}), torch::zeros({})};
  const auto before = clones({params[0], params[1], m.weight.grad()});
  const auto call = [&](const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& found_inf) {
    adagrad_step_groups_(params, grads, sums, steps, {2}, {0.1}, {0}, {0}, {1e-10},
                         c10::List<bool>({false}), c10::List<bool>({false}), lr_tensors,
                         /*rowwise=*/false, scale, found_inf);
  };
  expect_error([&] { call(torch::full({2}, 4.0f), std::nullopt); },
               {"grad_scale must be a one-element float32 tensor"});
  expect_error([&] { call(std::nullopt, torch::zeros({}, torch::kLong)); },
               {"found_inf must be a one-element float32 tensor"});
  EXPECT_TRUE(torch::equal(params[0], before[0]));
  EXPECT_TRUE(torch::equal(params[1], before[1]));
  EXPECT_TRUE(torch::equal(m.weight.grad(), before[2]));
  EXPECT_EQ(steps[0].item<float>(), 0.0f);

  call(torch::full({}, 4.0f), torch::zeros({}));
  EXPECT_TRUE(torch::equal(m.weight.grad(), before[2] / 4));
  EXPECT_EQ(steps[0].item<float>(), 1.0f);
}

}  // namespace
}  // namespace fused_adagrad::testing
