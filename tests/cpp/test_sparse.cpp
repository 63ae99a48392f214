// Sparse (embedding) grads through the C++ optimizer: the fused sparse step against
// torch::optim::Adagrad, and a bad index refused before anything changes.
#include "test_util.h"

namespace fused_adagrad::testing {
namespace {

TEST(SparseGrad, EmbeddingTrainingMatchesTorch) {
  torch::manual_seed(0);
  auto ours = torch::nn::Embedding(torch::nn::EmbeddingOptions(200, 16).sparse(true));
  auto ref = torch::nn::Embedding(torch::nn::EmbeddingOptions(200, 16).sparse(true));
  {
    torch::NoGradGuard no_grad;
    ref->weight.copy_(ours->weight);
  }
  Hyper h;
  h.lr = 0.05;
  h.lr_decay = 0.01;
  h.initial_accumulator_value = 0.1;
  FusedAdagrad opt(ours->parameters(), h.fused());
  torch::optim::Adagrad ref_opt(ref->parameters(), h.torch_options());
  for (int step = 0; step < 10; ++step) {
    const torch::Tensor ids = torch::randint(0, 200, {64, 3});  // repeated rows in every batch
    for (auto [module, optimizer] : {std::pair<torch::nn::Embedding&, torch::optim::Optimizer*>(ours, &opt),
                                     std::pair<torch::nn::Embedding&, torch::optim::Optimizer*>(ref, &ref_opt)}) {
      optimizer->zero_grad();
      module(ids).square().mean().backward();
      ASSERT_TRUE(module->weight.grad().is_sparse());
      optimizer->step();
    }
  }
  // Duplicates are summed in grad order and torch's sqrt is MKL's: ulps apart, not bits.
  EXPECT_TRUE(torch::allclose(ours->weight, ref->weight, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(fused_state(opt, ours->weight).sum(),
                              torch_state(ref_opt, ref->weight).sum(), 1e-5, 0));
  EXPECT_EQ(fused_state(opt, ours->weight).step().item<double>(), 10);
}

TEST(SparseGrad, OutOfRangeIndexChangesNothing) {
  torch::Tensor dense = torch::randn({8, 4}).requires_grad_(true);
  torch::Tensor table = torch::randn({10, 4}).requires_grad_(true);
  FusedAdagrad opt({dense, table}, FusedAdagradOptions(0.1));
  dense.mutable_grad() = torch::randn({8, 4});
  for (int64_t bad : {int64_t{10}, int64_t{-1}}) {
    table.mutable_grad() = torch::_sparse_coo_tensor_unsafe(
        torch::tensor({int64_t{2}, bad}, torch::kLong).view({1, 2}), torch::ones({2, 4}), {10, 4});
    const std::vector<torch::Tensor> before = clones({dense, table});
    expect_error([&] { opt.step(); },
                 {"param 1: sparse grad index " + std::to_string(bad), "out of range for dimension 0"});
    EXPECT_TRUE(torch::equal(dense.detach(), before[0]));
    EXPECT_TRUE(torch::equal(table.detach(), before[1]));
    for (const auto& p : {dense, table}) {
      EXPECT_EQ(fused_state(opt, p).step().item<double>(), 0);
      EXPECT_EQ(fused_state(opt, p).sum().abs().sum().item<double>(), 0);
    }
  }
}

}  // namespace
}  // namespace fused_adagrad::testing
