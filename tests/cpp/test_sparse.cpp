// Sparse (embedding) grads through the C++ optimizer: the fused sparse step against
// torch::optim::Adagrad, and a bad index refused before anything changes.
#include "test_util.h"

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

namespace fused_adagrad::testing {
namespace {

// The system's transparent huge page mode ("always", "madvise", "never"); empty where none.
std::string huge_page_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t open = text.find('['), close = text.find(']');
  return open == std::string::npos || close == std::string::npos ? ""
                                                                   : text.substr(open + 1, close - open - 1);
}

// AnonHugePages (bytes) of the mapping holding the first whole 2 MiB page of t (/proc/self/smaps).
int64_t huge_page_bytes(const torch::Tensor& t) {
  constexpr uintptr_t kPage = uintptr_t{2} << 20;
  const uintptr_t addr = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kPage - 1) & ~(kPage - 1);
  std::ifstream smaps("/proc/self/smaps");
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    std::istringstream fields(line);
    std::string first;
    fields >> first;
    const size_t dash = first.find('-');
    if (dash != std::string::npos && first.back() != ':') {
      const uintptr_t low = std::stoull(first.substr(0, dash), nullptr, 16);
      const uintptr_t high = std::stoull(first.substr(dash + 1), nullptr, 16);
      inside = low <= addr && addr < high;
    } else if (inside && first == "AnonHugePages:") {
      int64_t kib = 0;
      fields >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

// The state the optimizers create (and FusedEmbeddingBags' tables) is asked onto 2 MiB pages
// before its first write: a sparse step touches rows all over a table. 64 MiB and more, as
// smaller blocks may come from memory malloc has handed out (and written) before.
TEST(HugePages, LargeStateAndTablesLieOnHugePages) {
  const std::string mode = huge_page_mode();
  if (mode.empty() || mode == "never") GTEST_SKIP() << "no transparent huge pages here";
  torch::Tensor p = torch::zeros({1 << 24, 2});
  FusedAdagrad opt({p}, FusedAdagradOptions(0.1).initial_accumulator_value(0.25));
  RowWiseAdagrad row_opt({p}, RowWiseAdagradOptions(0.1).initial_accumulator_value(0.5));
  const torch::Tensor sum = fused_state(opt, p).sum();
  const torch::Tensor row_sum =
      static_cast<RowWiseAdagradParamState&>(*row_opt.state().at(p.unsafeGetTensorImpl())).sum();
  EXPECT_GT(huge_page_bytes(sum), 0);
  EXPECT_GT(huge_page_bytes(row_sum), 0);
  EXPECT_TRUE(torch::equal(sum, torch::full_like(sum, 0.25)));
  EXPECT_TRUE(torch::equal(row_sum, torch::full_like(row_sum, 0.5)));
  FusedEmbeddingBags bags(FusedEmbeddingBagsOptions({{1 << 20, 16}}));
  EXPECT_GT(huge_page_bytes(bags->weights[0]), 0);
  // A checkpoint's sums (torch allocated them) are copied onto huge pages as they load.
  std::stringstream saved;
  torch::save(opt, saved);
  FusedAdagrad resumed({p}, FusedAdagradOptions(0.1));
  torch::load(resumed, saved);
  EXPECT_GT(huge_page_bytes(fused_state(resumed, p).sum()), 0);
  EXPECT_TRUE(torch::equal(fused_state(resumed, p).sum(), sum));
  EXPECT_TRUE(advise_huge_pages(torch::empty({8 << 20}, torch::kUInt8)));
  EXPECT_FALSE(advise_huge_pages(torch::empty({1 << 20}, torch::kUInt8)));  // no whole page
}

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
