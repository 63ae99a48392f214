// The op through the dispatcher via the C++ wrappers (adagrad_step_, adagrad_step_groups_), and
// build_info().
#include "test_util.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>

namespace fused_adagrad::testing {
namespace {

// ctest also runs this binary with FUSED_ADAGRAD_CPU_KERNEL forcing each SIMD path. On a CPU
// without the forced one every step would throw: exit with 77, which ctest reports as skipped.
class ForcedKernelAvailable : public ::testing::Environment {
 public:
  void SetUp() override {
    const BuildInfo info = build_info();
    if (!info.cpu_kernel_error.empty()) {
      std::cerr << "skipping: " << info.cpu_kernel_error << "\n";
      std::exit(77);
    }
  }
};
[[maybe_unused]] ::testing::Environment* const kForcedKernel =
    ::testing::AddGlobalTestEnvironment(new ForcedKernelAvailable);

TEST(BuildInfo, DescribesThisBuild) {
  const BuildInfo info = build_info();
  EXPECT_EQ(info.version, FUSED_ADAGRAD_VERSION);
  EXPECT_EQ(info.version, FUSED_ADAGRAD_EXPECTED_VERSION);  // what CMake parsed for the project
  EXPECT_EQ(info.torch_version, TORCH_VERSION);
  ASSERT_FALSE(info.cpu_kernels.empty());
  EXPECT_EQ(info.cpu_kernels.front(), "base");
  EXPECT_NE(std::find(info.cpu_kernels.begin(), info.cpu_kernels.end(), info.cpu_kernel),
            info.cpu_kernels.end())
      << info.cpu_kernel;
  // The kernels this CPU runs are the narrowest ones compiled in, the selected one among them.
  ASSERT_FALSE(info.cpu_kernels_runnable.empty());
  ASSERT_LE(info.cpu_kernels_runnable.size(), info.cpu_kernels.size());
  EXPECT_TRUE(std::equal(info.cpu_kernels_runnable.begin(), info.cpu_kernels_runnable.end(),
                         info.cpu_kernels.begin()));
  EXPECT_NE(std::find(info.cpu_kernels_runnable.begin(), info.cpu_kernels_runnable.end(),
                      info.cpu_kernel),
            info.cpu_kernels_runnable.end())
      << info.cpu_kernel;
  EXPECT_EQ(info.cpu_kernel_error, "");
  if (!info.cuda) {
    EXPECT_TRUE(info.cuda_archs.empty());
    EXPECT_EQ(info.cuda_devices, 0);
  }
  if (const char* forced = std::getenv("FUSED_ADAGRAD_CPU_KERNEL"); forced && *forced) {
    EXPECT_EQ(info.cpu_kernel, forced);
  }
}

TEST(Op, SchemasAreRegistered) {
  auto& dispatcher = c10::Dispatcher::singleton();
  EXPECT_TRUE(dispatcher.findSchema({"fused_adagrad::adagrad_step_", ""}).has_value());
  EXPECT_TRUE(dispatcher.findSchema({"fused_adagrad::rowwise_adagrad_step_", ""}).has_value());
  EXPECT_TRUE(dispatcher.findSchema({"fused_adagrad::adagrad_step_groups_", ""}).has_value());
}

struct OpInputs {
  std::vector<torch::Tensor> params, sums, steps;
  OptionalTensorList grads;
};

// Three params: a plain one, one without grad, and a transposed one whose grad is contiguous.
OpInputs make_inputs() {
  torch::manual_seed(7);
  OpInputs in;
  in.params = {torch::randn({17}), torch::randn({3, 5}), torch::randn({6, 4}).t()};
  for (const auto& p : in.params) {
    in.sums.push_back(torch::rand_like(p));
    in.steps.push_back(torch::full({}, 2.0f));
  }
  in.grads.push_back(torch::randn({17}));
  in.grads.push_back(std::nullopt);
  in.grads.push_back(torch::randn({4, 6}));
  return in;
}

TEST(Op, StepsEveryParamWithAGrad) {
  OpInputs in = make_inputs();
  const OpInputs before{clones(in.params), clones(in.sums), clones(in.steps), OptionalTensorList()};
  Hyper h;
  h.lr = 0.1;
  h.lr_decay = 0.05;
  h.weight_decay = 0.01;
  adagrad_step_(in.params, in.grads, in.sums, in.steps, h.lr, h.lr_decay, h.weight_decay, h.eps,
                /*maximize=*/false, /*eps_inside_sqrt=*/false);

  for (size_t i : {0, 2}) {
    torch::Tensor ref_p = before.params[i].clone(), ref_s = before.sums[i].clone();
    reference_step(ref_p, *in.grads.get(i), ref_s, 3, h);
    expect_param_matches(in.params[i], ref_p, before.params[i]);
    expect_sum_matches(in.sums[i], ref_s);
    EXPECT_EQ(in.steps[i].item<float>(), 3);
  }
  // The transposed param was updated in place, keeping its layout.
  EXPECT_FALSE(in.params[2].is_contiguous());
  // No grad: no step.
  EXPECT_TRUE(torch::equal(in.params[1], before.params[1]));
  EXPECT_TRUE(torch::equal(in.sums[1], before.sums[1]));
  EXPECT_EQ(in.steps[1].item<float>(), 2);
}

TEST(Op, TensorLrEqualsFloatLr) {
  OpInputs a = make_inputs();
  OpInputs b = make_inputs();
  const float lr = 0.03f;
  adagrad_step_(a.params, a.grads, a.sums, a.steps, lr, 0, 0, 1e-10, false, false);
  adagrad_step_(b.params, b.grads, b.sums, b.steps, /*lr=*/0, 0, 0, 1e-10, false, false,
                torch::full({}, lr));
  for (size_t i = 0; i < a.params.size(); ++i) EXPECT_TRUE(torch::equal(a.params[i], b.params[i]));
}

// The op over groups as the optimizers call it: two groups of the inputs' first two params and
// the third, each with its own options.
void step_two_groups(OpInputs& in) {
  OptionalTensorList lr_tensors;
  lr_tensors.push_back(std::nullopt);
  lr_tensors.push_back(std::nullopt);
  adagrad_step_groups_(in.params, in.grads, in.sums, in.steps, {2, 1}, {0.1, 0.2}, {0, 0.01},
                       {0, 0.1}, {1e-10, 1e-10}, c10::List<bool>({false, true}),
                       c10::List<bool>({false, false}), lr_tensors, /*rowwise=*/false);
}

TEST(Op, GroupsOpNamesTheGroupAndParamAndChangesNothing) {
  OpInputs in = make_inputs();
  in.grads.set(2, torch::randn({6, 4}));
  const auto params_before = clones(in.params);
  expect_error([&] { step_two_groups(in); }, {"param group 1, param 0", "grad has shape"});
  expect_error([&] {
    adagrad_step_(in.params, in.grads, in.sums, in.steps, 0.1, 0, 0, 1e-10, false, false);
  }, {"param 2"});
  for (size_t i = 0; i < in.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(in.params[i], params_before[i]));
  }
  EXPECT_EQ(in.steps[0].item<float>(), 2);

  in.sums.pop_back();
  expect_error([&] { step_two_groups(in); }, {"same length"});
}

TEST(Op, GroupsOpEqualsOneCallPerGroup) {
  OpInputs a = make_inputs();
  OpInputs b = make_inputs();
  step_two_groups(a);
  const auto first = [](const auto& v) { return at::TensorList(v).slice(0, 2); };
  const auto last = [](const auto& v) { return at::TensorList(v).slice(2, 1); };
  OptionalTensorList grads_first, grads_last;
  for (size_t i = 0; i < 3; ++i) (i < 2 ? grads_first : grads_last).push_back(b.grads.get(i));
  adagrad_step_(first(b.params), grads_first, first(b.sums), first(b.steps), 0.1, 0, 0, 1e-10,
                false, false);
  adagrad_step_(last(b.params), grads_last, last(b.sums), last(b.steps), 0.2, 0.01, 0.1, 1e-10,
                true, false);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(torch::equal(a.params[i], b.params[i])) << i;
    EXPECT_TRUE(torch::equal(a.sums[i], b.sums[i])) << i;
    EXPECT_TRUE(torch::equal(a.steps[i], b.steps[i])) << i;
  }
}

// The Meta kernel validates shapes without touching data (torch.compile traces through it).
TEST(Op, MetaTensorsValidateOnly) {
  auto meta = [](std::vector<int64_t> shape) { return torch::empty(shape, torch::kMeta); };
  std::vector<torch::Tensor> params{meta({4}), meta({2, 3})};
  std::vector<torch::Tensor> sums{meta({4}), meta({2, 3})};
  const auto meta_float = torch::dtype(torch::kFloat).device(torch::kMeta);
  std::vector<torch::Tensor> steps{torch::empty({}, meta_float), torch::empty({}, meta_float)};
  OptionalTensorList grads;
  grads.push_back(meta({4}));
  grads.push_back(meta({2, 3}));
  adagrad_step_(params, grads, sums, steps, 0.1, 0, 0, 1e-10, false, false);
  grads.set(1, meta({3, 2}));
  expect_error([&] { adagrad_step_(params, grads, sums, steps, 0.1, 0, 0, 1e-10, false, false); },
               {"param 1"});
}

// Not differentiable: in grad mode it refuses to write tensors that require grad; under no_grad
// it writes them and bumps their version counters.
TEST(Op, AutogradRules) {
  torch::Tensor p = torch::ones({3}, torch::requires_grad());
  std::vector<torch::Tensor> params{p}, sums{torch::zeros({3})}, steps{torch::zeros({})};
  OptionalTensorList grads;
  grads.push_back(torch::ones({3}));
  expect_error([&] { adagrad_step_(params, grads, sums, steps, 0.1, 0, 0, 1e-10, false, false); },
               {"torch.no_grad()"});
  EXPECT_TRUE(torch::equal(p.detach(), torch::ones({3})));

  torch::NoGradGuard no_grad;
  const auto version = p._version();
  adagrad_step_(params, grads, sums, steps, 0.1, 0, 0, 1e-10, false, false);
  EXPECT_GT(p._version(), version);
  EXPECT_FALSE(torch::equal(p.detach(), torch::ones({3})));
}

}  // namespace
}  // namespace fused_adagrad::testing
