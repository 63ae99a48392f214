// fused_adagrad::FusedAdagrad on CUDA against torch::optim::Adagrad on CUDA. Uses no CUDA header,
// so it also compiles against a CPU-only LibTorch, where every test skips.
#include <fused_adagrad/fused_adagrad.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace {

// FUSED_ADAGRAD_REQUIRE_CUDA=1 (on a GPU machine) turns the skips into failures.
bool cuda_required() {
  const char* v = std::getenv("FUSED_ADAGRAD_REQUIRE_CUDA");
  return v != nullptr && std::string(v) == "1";
}

#define SKIP_WITHOUT_CUDA()                                                              \
  do {                                                                                   \
    const char* why = !torch::cuda::is_available()          ? "no CUDA device"           \
                      : !fused_adagrad::build_info().cuda ? "fused_adagrad built without CUDA" \
                                                          : nullptr;                   \
    if (why != nullptr && cuda_required()) FAIL() << why << " (FUSED_ADAGRAD_REQUIRE_CUDA=1)"; \
    if (why != nullptr) GTEST_SKIP() << why;                                             \
  } while (0)

const auto kCuda = torch::TensorOptions().device(torch::kCUDA);

// Grads that do not depend on the params, so both optimizers see the same ones at every step.
std::vector<std::vector<torch::Tensor>> grad_sequence(const std::vector<torch::Tensor>& params,
                                                      int steps) {
  torch::manual_seed(1);
  std::vector<std::vector<torch::Tensor>> grads(steps);
  for (auto& step_grads : grads) {
    for (const auto& p : params) step_grads.push_back(torch::randn(p.sizes(), kCuda));
  }
  return grads;
}

std::vector<torch::Tensor> clones(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.clone());
  return out;
}

TEST(FusedAdagradCuda, MatchesTorchAdagradOver100Steps) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(0);
  std::vector<torch::Tensor> params;
  for (int64_t n : {1, 15, 17, 1023, (1 << 20) + 3}) params.push_back(torch::randn({n}, kCuda));
  params.push_back(torch::randn({33, 7}, kCuda));
  const auto grads = grad_sequence(params, 100);

  auto ours = clones(params);
  auto theirs = clones(params);
  fused_adagrad::FusedAdagrad opt(ours, fused_adagrad::FusedAdagradOptions(0.05)
                                            .lr_decay(0.01)
                                            .weight_decay(0.01)
                                            .initial_accumulator_value(0.1)
                                            .eps(1e-8));
  torch::optim::Adagrad opt_t(theirs, torch::optim::AdagradOptions(0.05)
                                          .lr_decay(0.01)
                                          .weight_decay(0.01)
                                          .initial_accumulator_value(0.1)
                                          .eps(1e-8));
  for (const auto& step_grads : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      ours[i].mutable_grad() = step_grads[i].clone();
      theirs[i].mutable_grad() = step_grads[i].clone();
    }
    opt.step();
    opt_t.step();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(ours[i], theirs[i], 1e-6, 1e-6)) << "param " << i;
    const auto& state = static_cast<const fused_adagrad::FusedAdagradParamState&>(
        *opt.state().at(ours[i].unsafeGetTensorImpl()));
    const auto& state_t = static_cast<const torch::optim::AdagradParamState&>(
        *opt_t.state().at(theirs[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(torch::allclose(state.sum(), state_t.sum(), 1e-6, 1e-6)) << "sum " << i;
    EXPECT_TRUE(state.step().is_cuda());  // the step lives on the device: no host sync
    EXPECT_EQ(state.step().item<float>(), 100.0f);
  }
}

TEST(FusedAdagradCuda, MisalignedViewsGiveTheNumbersOfAlignedTensors) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(2);
  for (int64_t n : {int64_t{1}, int64_t{17}, int64_t{1023}, int64_t{(1 << 20) + 3}}) {
    // Views that start at element 1 of their buffer: 4 bytes past a 16-byte boundary.
    auto view_of = [&](const torch::Tensor& t) {
      auto buffer = torch::empty({n + 1}, kCuda);
      buffer.narrow(0, 1, n).copy_(t);
      return buffer.narrow(0, 1, n);
    };
    const auto p = torch::randn({n}, kCuda), g = torch::randn({n}, kCuda);
    const auto s = torch::rand({n}, kCuda);
    std::vector<torch::Tensor> mp{view_of(p)}, ms{view_of(s)}, ap{p.clone()}, as{s.clone()};
    fused_adagrad::OptionalTensorList mg, ag;
    mg.push_back(view_of(g));
    ag.push_back(g.clone());
    ASSERT_NE(reinterpret_cast<uintptr_t>(mp[0].data_ptr()) % 16, 0u);
    std::vector<torch::Tensor> msteps{torch::zeros({}, kCuda)}, asteps{torch::zeros({}, kCuda)};
    for (int k = 0; k < 3; ++k) {
      fused_adagrad::adagrad_step_(mp, mg, ms, msteps, 0.05, 0.01, 0.01, 1e-8, false, false);
      fused_adagrad::adagrad_step_(ap, ag, as, asteps, 0.05, 0.01, 0.01, 1e-8, false, false);
    }
    EXPECT_TRUE(torch::equal(mp[0], ap[0])) << "n = " << n;
    EXPECT_TRUE(torch::equal(ms[0], as[0])) << "n = " << n;
    EXPECT_EQ(msteps[0].item<float>(), 3.0f);
  }
}

TEST(FusedAdagradCuda, MixedDtypesInOneGroup) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(3);
  std::vector<torch::Tensor> params{torch::randn({17}, kCuda),
                                    torch::randn({33}, kCuda.dtype(torch::kBFloat16)),
                                    torch::randn({5}, kCuda.dtype(torch::kFloat64))};
  const auto grads = grad_sequence(params, 10);
  auto together = clones(params);
  fused_adagrad::FusedAdagrad opt(together, fused_adagrad::FusedAdagradOptions(0.05));
  for (const auto& step_grads : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      together[i].mutable_grad() = step_grads[i].to(params[i].scalar_type());
    }
    opt.step();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<torch::Tensor> alone{params[i].clone()};
    fused_adagrad::FusedAdagrad opt_alone(alone, fused_adagrad::FusedAdagradOptions(0.05));
    for (const auto& step_grads : grads) {
      alone[0].mutable_grad() = step_grads[i].to(params[i].scalar_type());
      opt_alone.step();
    }
    EXPECT_TRUE(torch::equal(together[i], alone[0])) << "param " << i;
  }
}

}  // namespace
