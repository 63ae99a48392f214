// The RowWiseAdagrad class: its arithmetic against a float32 tensor-op reference (bitwise), the
// shape and dtype of its state, sparse grads, failed steps and save/load.
#include "test_util.h"

#include <sstream>

namespace fused_adagrad::testing {
namespace {

RowWiseAdagradOptions rowwise_options(const Hyper& h) {
  return RowWiseAdagradOptions(h.lr).lr_decay(h.lr_decay).weight_decay(h.weight_decay)
      .initial_accumulator_value(h.initial_accumulator_value).eps(h.eps).maximize(h.maximize)
      .eps_inside_sqrt(h.eps_inside_sqrt);
}

RowWiseAdagradParamState& rowwise_state(RowWiseAdagrad& opt, const torch::Tensor& p) {
  return static_cast<RowWiseAdagradParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
}

// A float32 tensor shaped like `like` holding `v` rounded to float, so that every operation below
// is a float32 one (no double scalar, no fused multiply-add through an `alpha`).
torch::Tensor f32(double v, const torch::Tensor& like) {
  return torch::full_like(like, static_cast<float>(v));
}

// One row-wise step of a 2-D float32 param with plain tensor ops, in the kernel's order
// (csrc/cpu/kernel_impl.h): squares summed in 8 interleaved lanes, the lanes added pairwise,
// and the IEEE sqrt (torch's may be MKL's, not correctly rounded). `step` is the value after
// the increment.
void rowwise_reference_step(torch::Tensor p, const torch::Tensor& grad, torch::Tensor m,
                            int64_t step, const Hyper& h) {
  torch::NoGradGuard no_grad;
  torch::Tensor g = h.maximize ? -grad : grad;
  if (h.weight_decay != 0) g = g + p * f32(h.weight_decay, p);
  constexpr int64_t kLanes = 8;
  const int64_t row_len = p.size(1);
  std::vector<torch::Tensor> lane;
  for (int64_t j = 0; j < kLanes; ++j) lane.push_back(torch::zeros({p.size(0)}));
  for (int64_t e = 0; e < row_len; ++e) {
    const torch::Tensor ge = g.select(1, e);
    lane[e % kLanes] = lane[e % kLanes] + ge * ge;
  }
  const torch::Tensor total =
      ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  m.copy_(m + total / f32(static_cast<double>(row_len), total));
  const torch::Tensor denom =
      h.eps_inside_sqrt ? ieee_sqrt(m + f32(h.eps, m)) : ieee_sqrt(m) + f32(h.eps, m);
  const double neg_clr = -(h.lr / (1 + static_cast<double>(step - 1) * h.lr_decay));
  const torch::Tensor scale = f32(neg_clr, denom) / denom;
  p.copy_(p + scale.unsqueeze(1) * g);
}

// 13 elements a row: one full pass of the 8 lanes and a partial one.
TEST(RowWiseAdagrad, DenseStepsMatchFloat32ReferenceBitwise) {
  Hyper decays;
  decays.lr = 0.1;
  decays.lr_decay = 0.05;
  decays.weight_decay = 0.02;
  decays.initial_accumulator_value = 0.1;
  decays.eps = 1e-3;  // large enough to matter next to sqrt(m)
  Hyper flipped = decays;
  flipped.maximize = true;
  flipped.eps_inside_sqrt = true;
  for (const Hyper& h : {decays, flipped}) {
    torch::manual_seed(7);
    const torch::Tensor p0 = torch::randn({6, 13});
    torch::Tensor p = p0.clone().requires_grad_(true);
    RowWiseAdagrad opt({p}, rowwise_options(h));
    torch::Tensor ref_p = p0.clone();
    torch::Tensor ref_m = torch::full({6}, static_cast<float>(h.initial_accumulator_value));
    for (int64_t step = 1; step <= 5; ++step) {
      const torch::Tensor g = torch::randn({6, 13});
      p.mutable_grad() = g.clone();
      opt.step();
      rowwise_reference_step(ref_p, g, ref_m, step, h);
      EXPECT_TRUE(torch::equal(p.detach(), ref_p))
          << "step " << step << ", max ulp " << max_ulp_diff(p.detach(), ref_p);
      EXPECT_TRUE(torch::equal(rowwise_state(opt, p).sum(), ref_m))
          << "step " << step << ", max ulp " << max_ulp_diff(rowwise_state(opt, p).sum(), ref_m);
    }
    EXPECT_EQ(rowwise_state(opt, p).step().item<float>(), 5);
  }
}

TEST(RowWiseAdagrad, StateHasOneValuePerRow) {
  Hyper h;
  h.initial_accumulator_value = 0.25;
  torch::Tensor table = torch::randn({5, 3}).to(torch::kBFloat16).requires_grad_(true);
  torch::Tensor scalar = torch::tensor(1.5f).requires_grad_(true);
  torch::Tensor wide = torch::randn({4, 2, 3}, torch::kDouble).requires_grad_(true);
  RowWiseAdagrad opt({table, scalar, wide}, rowwise_options(h));

  const auto& t = rowwise_state(opt, table);
  EXPECT_EQ(t.sum().sizes(), torch::IntArrayRef({5}));
  EXPECT_EQ(t.sum().scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(t.sum(), torch::full({5}, 0.25f)));
  const auto& s = rowwise_state(opt, scalar);
  EXPECT_EQ(s.sum().dim(), 0);
  EXPECT_EQ(s.sum().scalar_type(), torch::kFloat);
  const auto& w = rowwise_state(opt, wide);
  EXPECT_EQ(w.sum().sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(w.sum().scalar_type(), torch::kDouble);
  for (const auto& p : {table, scalar, wide}) {
    const auto& state = rowwise_state(opt, p);
    EXPECT_EQ(state.step().dim(), 0);
    EXPECT_EQ(state.step().scalar_type(), torch::kFloat);
  }

  // The op takes this state as it is: every param steps, and the 0-d one as a row of one.
  table.mutable_grad() = torch::ones({5, 3}, torch::kBFloat16);
  scalar.mutable_grad() = torch::tensor(2.0f);
  wide.mutable_grad() = torch::ones({4, 2, 3}, torch::kDouble);
  const auto before = clones({table, scalar, wide});
  opt.step();
  EXPECT_FALSE(torch::equal(table.detach(), before[0]));
  EXPECT_FALSE(torch::equal(wide.detach(), before[2]));
  // m = 0.25 + 2 * 2, p = 1.5 - 0.01 * 2 / (sqrt(m) + 1e-10).
  EXPECT_FLOAT_EQ(s.sum().item<float>(), 4.25f);
  EXPECT_FLOAT_EQ(scalar.item<float>(), static_cast<float>(1.5 - 0.02 / std::sqrt(4.25)));
  EXPECT_EQ(s.step().item<float>(), 1);
}

// Weight decay applies to the rows the grad touches, and to no other.
TEST(RowWiseAdagrad, SparseGradStepsOnlyTouchedRows) {
  Hyper h;
  h.lr = 0.1;
  h.weight_decay = 0.1;
  h.initial_accumulator_value = 0.5;
  torch::manual_seed(8);
  const torch::Tensor p0 = torch::randn({10, 4});
  // Row 2 twice: its grad is the sum of both value rows.
  const torch::Tensor grad = torch::sparse_coo_tensor(
      torch::tensor({int64_t{2}, int64_t{7}, int64_t{2}}).view({1, 3}), torch::randn({3, 4}),
      {10, 4});
  torch::Tensor p = p0.clone().requires_grad_(true);
  p.mutable_grad() = grad;
  RowWiseAdagrad opt({p}, rowwise_options(h));
  opt.step();

  // A dense step with the summed grad, for the touched rows.
  torch::Tensor dense = p0.clone().requires_grad_(true);
  dense.mutable_grad() = grad.to_dense();
  RowWiseAdagrad dense_opt({dense}, rowwise_options(h));
  dense_opt.step();

  const torch::Tensor touched = torch::tensor({int64_t{2}, int64_t{7}});
  const torch::Tensor m = rowwise_state(opt, p).sum();
  EXPECT_TRUE(torch::equal(p.detach().index_select(0, touched),
                           dense.detach().index_select(0, touched)));
  EXPECT_TRUE(torch::equal(m.index_select(0, touched),
                           rowwise_state(dense_opt, dense).sum().index_select(0, touched)));
  for (int64_t r = 0; r < 10; ++r) {
    if (r == 2 || r == 7) continue;
    EXPECT_TRUE(torch::equal(p.detach()[r], p0[r])) << "row " << r;
    EXPECT_EQ(m[r].item<float>(), 0.5f) << "row " << r;
  }
  EXPECT_FALSE(torch::equal(p.detach()[2], p0[2]));
  EXPECT_EQ(rowwise_state(opt, p).step().item<float>(), 1);
}

TEST(RowWiseAdagrad, BadGradInSecondGroupChangesNothing) {
  torch::manual_seed(9);
  torch::Tensor a = torch::randn({4, 3}).requires_grad_(true);
  torch::Tensor b = torch::randn({5, 2}).requires_grad_(true);
  torch::Tensor c = torch::randn({3}).requires_grad_(true);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a});
  groups.emplace_back(std::vector<torch::Tensor>{b, c},
                      std::make_unique<RowWiseAdagradOptions>(RowWiseAdagradOptions(0.3)));
  RowWiseAdagrad opt(groups, RowWiseAdagradOptions(0.1).initial_accumulator_value(0.1));
  for (auto& p : {a, b, c}) p.mutable_grad() = torch::randn_like(p);
  opt.step();

  a.mutable_grad() = torch::randn_like(a);
  b.mutable_grad() = torch::randn_like(b);
  c.mutable_grad() = torch::randn({3}, torch::kDouble);
  const auto params_before = clones({a, b, c});
  std::vector<torch::Tensor> sums, steps;
  for (const auto& p : {a, b, c}) {
    sums.push_back(rowwise_state(opt, p).sum());
    steps.push_back(rowwise_state(opt, p).step());
  }
  const auto sums_before = clones(sums);
  const auto steps_before = clones(steps);
  expect_error([&] { opt.step(); }, {"RowWiseAdagrad: param group 1", "param 1", "dtype"});
  const std::vector<torch::Tensor> params{a, b, c};
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::equal(params[i], params_before[i])) << "param " << i;
    EXPECT_TRUE(torch::equal(rowwise_state(opt, params[i]).sum(), sums_before[i])) << "sum " << i;
    EXPECT_TRUE(torch::equal(rowwise_state(opt, params[i]).step(), steps_before[i]))
        << "step " << i;
  }

  // And the optimizer still works afterwards.
  c.mutable_grad() = torch::randn_like(c);
  opt.step();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_FALSE(torch::equal(params[i], params_before[i])) << "param " << i;
    EXPECT_EQ(rowwise_state(opt, params[i]).step().item<float>(), 2) << "param " << i;
  }
}

// Params added later get state with their own group's options, as in FusedAdagrad.
TEST(RowWiseAdagrad, AddParamGroupUsesTheGroupsOptions) {
  torch::Tensor a = torch::zeros({3, 2}, torch::requires_grad());
  torch::Tensor b = torch::zeros({4, 2}, torch::requires_grad());
  RowWiseAdagrad opt({a}, RowWiseAdagradOptions(0.1).initial_accumulator_value(0.25));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {b}, std::make_unique<RowWiseAdagradOptions>(
               RowWiseAdagradOptions(0.2).initial_accumulator_value(0.5))));
  ASSERT_EQ(opt.param_groups().size(), 2u);
  const auto& o = static_cast<const RowWiseAdagradOptions&>(opt.param_groups()[1].options());
  EXPECT_EQ(o.lr(), 0.2);
  opt.step();  // creates b's state
  EXPECT_TRUE(torch::equal(rowwise_state(opt, a).sum(), torch::full({3}, 0.25f)));
  EXPECT_TRUE(torch::equal(rowwise_state(opt, b).sum(), torch::full({4}, 0.5f)));
  expect_error([&] {
    opt.add_param_group(torch::optim::OptimizerParamGroup(
        {torch::zeros({2}, torch::requires_grad())},
        std::make_unique<RowWiseAdagradOptions>(RowWiseAdagradOptions().eps(-1))));
  }, {"Invalid epsilon value: -1"});
  EXPECT_EQ(opt.param_groups().size(), 2u);
}

// torch::save/torch::load into a fresh optimizer over equal params: from there the two runs
// stay bitwise identical.
TEST(RowWiseAdagrad, SaveLoadContinuesIdentically) {
  Hyper h;
  h.lr = 0.05;
  h.lr_decay = 1e-3;
  h.weight_decay = 1e-2;
  h.initial_accumulator_value = 0.1;
  h.eps = 1e-8;
  h.eps_inside_sqrt = true;
  const Data data = make_data();
  auto model = make_model();
  RowWiseAdagrad opt(model->parameters(), rowwise_options(h));
  for (int i = 0; i < 10; ++i) train_step(model, opt, data);

  std::stringstream buffer;
  torch::save(opt, buffer);
  auto model2 = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  torch::nn::Sequential reloaded_model(model2);
  RowWiseAdagrad reloaded(reloaded_model->parameters(), RowWiseAdagradOptions(0.5));
  torch::load(reloaded, buffer);

  const auto ps = model->parameters();
  const auto qs = reloaded_model->parameters();
  ASSERT_EQ(reloaded.param_groups().size(), 1u);
  EXPECT_TRUE(static_cast<const RowWiseAdagradOptions&>(reloaded.param_groups()[0].options()) ==
              rowwise_options(h));
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& a = rowwise_state(opt, ps[i]);
    const auto& b = rowwise_state(reloaded, qs[i]);
    EXPECT_TRUE(a == b) << "state of param " << i;
    EXPECT_EQ(b.sum().sizes(), torch::IntArrayRef({qs[i].size(0)})) << "param " << i;
    EXPECT_EQ(b.step().item<float>(), 10);
  }

  for (int i = 0; i < 20; ++i) {
    train_step(model, opt, data);
    train_step(reloaded_model, reloaded, data);
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::equal(ps[i], qs[i])) << "param " << i;
    EXPECT_TRUE(rowwise_state(opt, ps[i]) == rowwise_state(reloaded, qs[i])) << "param " << i;
  }
}

}  // namespace
}  // namespace fused_adagrad::testing
