// The FusedAdagrad class beyond parity: eps_inside_sqrt, option validation, save/load,
// add_param_group, and the guarantee that a failed step changes nothing.
#include "test_util.h"

#include <sstream>

#include <torch/version.h>

namespace fused_adagrad::testing {
namespace {

// eps_inside_sqrt has no torch counterpart: compare with the tensor-op reference, one step from a
// random state (bitwise) and along a training run.
TEST(EpsInsideSqrt, OneStepMatchesReference) {
  Hyper plain;
  plain.lr = 0.1;
  plain.eps = 0.1;  // large enough that sqrt(sum + eps) and sqrt(sum) + eps differ visibly
  plain.eps_inside_sqrt = true;
  Hyper all = plain;
  all.lr_decay = 0.1;
  all.weight_decay = 0.1;
  all.maximize = true;
  for (const Hyper& h : {plain, all}) {
    for (torch::Dtype dtype : {torch::kFloat, torch::kDouble}) {
      torch::manual_seed(4);
      const torch::Tensor p0 = torch::randn({257}, dtype);
      const torch::Tensor g = torch::randn({257}, dtype);
      const torch::Tensor s0 = torch::rand({257}, dtype);
      torch::Tensor p = p0.clone().requires_grad_(true);
      p.mutable_grad() = g.clone();
      FusedAdagrad opt({p}, h.fused());
      fused_state(opt, p).sum().copy_(s0);
      fused_state(opt, p).step().fill_(2);
      opt.step();

      torch::Tensor ref_p = p0.clone(), ref_s = s0.clone();
      reference_step(ref_p, g, ref_s, 3, h);
      expect_param_matches(p.detach(), ref_p, p0);
      expect_sum_matches(fused_state(opt, p).sum(), ref_s);

      Hyper outside = h;
      outside.eps_inside_sqrt = false;
      torch::Tensor other_p = p0.clone(), other_s = s0.clone();
      reference_step(other_p, g, other_s, 3, outside);
      EXPECT_GT((p.detach() - other_p).abs().max().item<double>(), 1e-3);
    }
  }
}

TEST(EpsInsideSqrt, TrainingMatchesReference) {
  Hyper h;
  h.lr = 0.05;
  h.eps = 1e-2;
  h.initial_accumulator_value = 0.1;
  h.eps_inside_sqrt = true;
  const Data data = make_data();
  auto model = make_model();
  auto ref_model = make_model();
  FusedAdagrad opt(model->parameters(), h.fused());
  std::vector<torch::Tensor> ref_sums;
  for (const auto& q : ref_model->parameters()) {
    ref_sums.push_back(torch::full_like(q, h.initial_accumulator_value));
  }
  for (int step = 1; step <= 100; ++step) {
    train_step(model, opt, data);
    ref_model->zero_grad();
    torch::mse_loss(ref_model->forward(data.x), data.y).backward();
    const auto qs = ref_model->parameters();
    for (size_t i = 0; i < qs.size(); ++i) {
      reference_step(qs[i], qs[i].grad(), ref_sums[i], step, h);
    }
  }
  // Same arithmetic in the same order: bitwise, unless a forced kernel uses FMAs unlike torch.
  const auto ps = model->parameters();
  const auto qs = ref_model->parameters();
  for (size_t i = 0; i < ps.size(); ++i) {
    if (same_fma_as_torch()) {
      EXPECT_TRUE(torch::equal(ps[i], qs[i])) << "param " << i;
      EXPECT_TRUE(torch::equal(fused_state(opt, ps[i]).sum(), ref_sums[i])) << "param " << i;
    } else {
      EXPECT_TRUE(torch::allclose(ps[i], qs[i], 1e-5, 1e-6)) << "param " << i;
    }
  }
}

// torch::optim::Adagrad's messages, word for word.
TEST(Options, InvalidValuesThrowTorchMessages) {
  auto params = [] {
    return std::vector<torch::Tensor>{torch::zeros({2}, torch::requires_grad())};
  };
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions(-1)); },
               {"Invalid learning rate: -1"});
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions().lr_decay(-1)); },
               {"Invalid lr_decay value: -1"});
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions().weight_decay(-1)); },
               {"Invalid weight_decay value: -1"});
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions().initial_accumulator_value(-1)); },
               {"Invalid initial_accumulator_value value: -1"});
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions().eps(-1)); },
               {"Invalid epsilon value: -1"});
  expect_error([&] { FusedAdagrad(params(), FusedAdagradOptions(std::nan(""))); },
               {"Invalid learning rate: nan"});
  // The same texts as torch's own optimizer.
  expect_error([&] { torch::optim::Adagrad(params(), torch::optim::AdagradOptions(-1)); },
               {"Invalid learning rate: -1"});
  expect_error([&] { torch::optim::Adagrad(params(), torch::optim::AdagradOptions().eps(-1)); },
               {"Invalid epsilon value: -1"});
  // Zero is allowed everywhere.
  FusedAdagrad ok(params(), FusedAdagradOptions(0).lr_decay(0).weight_decay(0).eps(0));
}

TEST(Options, InvalidGroupOptionsThrow) {
  torch::Tensor a = torch::zeros({2}, torch::requires_grad());
  torch::Tensor b = torch::zeros({2}, torch::requires_grad());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a});
  groups.emplace_back(std::vector<torch::Tensor>{b}, std::make_unique<FusedAdagradOptions>(
                                                         FusedAdagradOptions().weight_decay(-2)));
  expect_error([&] { FusedAdagrad(groups, FusedAdagradOptions()); },
               {"Invalid weight_decay value: -2"});

  // An option made invalid after construction is caught at the step, before anything changes.
  FusedAdagrad opt({a}, FusedAdagradOptions(0.1));
  a.mutable_grad() = torch::ones({2});
  opt.param_groups()[0].options().set_lr(-0.5);
  expect_error([&] { opt.step(); }, {"Invalid learning rate: -0.5"});
  EXPECT_TRUE(torch::equal(a.detach(), torch::zeros({2})));
  EXPECT_EQ(fused_state(opt, a).step().item<float>(), 0);
}

// torch::save/torch::load into a fresh optimizer over equal params: same state and options, and
// from there the two runs stay bitwise identical.
TEST(Serialize, RoundTripContinuesIdentically) {
  Hyper h;
  h.lr = 0.05;
  h.lr_decay = 1e-3;
  h.weight_decay = 1e-2;
  h.initial_accumulator_value = 0.1;
  h.eps = 1e-8;
  h.eps_inside_sqrt = true;
  const Data data = make_data();
  auto model = make_model();
  FusedAdagrad opt(model->parameters(), h.fused());
  for (int i = 0; i < 10; ++i) train_step(model, opt, data);

  std::stringstream buffer;
  torch::save(opt, buffer);
  auto model2 = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  torch::nn::Sequential reloaded_model(model2);
  FusedAdagrad reloaded(reloaded_model->parameters(), FusedAdagradOptions(0.5));
  torch::load(reloaded, buffer);

  const auto ps = model->parameters();
  const auto qs = reloaded_model->parameters();
  ASSERT_EQ(reloaded.param_groups().size(), 1u);
  EXPECT_TRUE(static_cast<const FusedAdagradOptions&>(reloaded.param_groups()[0].options()) ==
              h.fused());
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& a = fused_state(opt, ps[i]);
    const auto& b = fused_state(reloaded, qs[i]);
    EXPECT_TRUE(a == b) << "state of param " << i;
    EXPECT_EQ(b.step().scalar_type(), torch::kFloat);
    EXPECT_EQ(b.step().item<float>(), 10);
  }

  for (int i = 0; i < 20; ++i) {
    train_step(model, opt, data);
    train_step(reloaded_model, reloaded, data);
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::equal(ps[i], qs[i])) << "param " << i;
    EXPECT_TRUE(fused_state(opt, ps[i]) == fused_state(reloaded, qs[i])) << "param " << i;
  }
}

// torch::optim::Adagrad has no state for params added later (pytorch issue 87706); ours creates it
// with the new group's own initial_accumulator_value.
TEST(AddParamGroup, NewParamsGetStateAndStep) {
  torch::manual_seed(5);
  const torch::Tensor a0 = torch::randn({5});
  const torch::Tensor b0 = torch::randn({3, 2});
  const torch::Tensor c0 = torch::randn({4});
  torch::Tensor a = a0.clone().requires_grad_(true);
  torch::Tensor b = b0.clone().requires_grad_(true);
  torch::Tensor c = c0.clone().requires_grad_(true);
  FusedAdagrad opt({a}, FusedAdagradOptions(0.1).initial_accumulator_value(0.25));
  Hyper hb;
  hb.lr = 0.2;
  hb.initial_accumulator_value = 0.5;
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {b}, std::make_unique<FusedAdagradOptions>(hb.fused())));
  opt.add_param_group(torch::optim::OptimizerParamGroup({c}));  // the defaults

  torch::Tensor ga = torch::randn({5}), gb = torch::randn({3, 2}), gc = torch::randn({4});
  a.mutable_grad() = ga;
  b.mutable_grad() = gb;
  c.mutable_grad() = gc;
  opt.step();

  auto check = [](const torch::Tensor& p, const torch::Tensor& p0, const torch::Tensor& g,
                  const FusedAdagradParamState& state, const Hyper& h) {
    torch::Tensor ref_p = p0.clone();
    torch::Tensor ref_s = torch::full_like(p0, h.initial_accumulator_value);
    reference_step(ref_p, g, ref_s, 1, h);
    EXPECT_EQ(state.step().item<float>(), 1);
    expect_sum_matches(state.sum(), ref_s);
    expect_param_matches(p.detach(), ref_p, p0);
  };
  Hyper ha;
  ha.lr = 0.1;
  ha.initial_accumulator_value = 0.25;
  check(a, a0, ga, fused_state(opt, a), ha);
  check(b, b0, gb, fused_state(opt, b), hb);
  check(c, c0, gc, fused_state(opt, c), ha);
}

// Group options resolve as torch::optim::Adagrad's do (torch 2.13): fields left at the options'
// constructor value inherit the optimizer's defaults, in the constructor and in add_param_group.
TEST(AddParamGroup, GroupOptionsResolveLikeTorch) {
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 13
  GTEST_SKIP() << "torch " << TORCH_VERSION << " resolves group options another way than the "
               << "2.13 rules we follow (seen on 2.11: no inheritance of the defaults)";
#endif
  auto leaf = [] { return torch::zeros({2}, torch::requires_grad()); };
  const std::vector<torch::Tensor> a{leaf()}, b{leaf()}, c{leaf()}, d{leaf()};
  std::vector<torch::optim::OptimizerParamGroup> ours_groups, torch_groups;
  ours_groups.emplace_back(a);
  ours_groups.emplace_back(
      b, std::make_unique<FusedAdagradOptions>(FusedAdagradOptions(0.2).eps(1e-3)));
  torch_groups.emplace_back(c);
  torch_groups.emplace_back(d, std::make_unique<torch::optim::AdagradOptions>(
                                   torch::optim::AdagradOptions(0.2).eps(1e-3)));
  Hyper defaults;
  defaults.lr = 0.1;
  defaults.initial_accumulator_value = 0.25;
  defaults.weight_decay = 0.5;
  FusedAdagrad ours(ours_groups, defaults.fused());
  torch::optim::Adagrad theirs(torch_groups, defaults.torch_options());
  // lr 0.01 and weight_decay 0 equal the constructor defaults, so they are inherited.
  ours.add_param_group(torch::optim::OptimizerParamGroup(
      {leaf()}, std::make_unique<FusedAdagradOptions>(
                    FusedAdagradOptions(0.01).weight_decay(0).lr_decay(0.3))));
  theirs.add_param_group(torch::optim::OptimizerParamGroup(
      {leaf()}, std::make_unique<torch::optim::AdagradOptions>(
                    torch::optim::AdagradOptions(0.01).weight_decay(0).lr_decay(0.3))));
  ASSERT_EQ(ours.param_groups().size(), 3u);
  for (size_t g = 0; g < 3; ++g) {
    const auto& o = static_cast<const FusedAdagradOptions&>(ours.param_groups()[g].options());
    const auto& t =
        static_cast<const torch::optim::AdagradOptions&>(theirs.param_groups()[g].options());
    EXPECT_EQ(o.lr(), t.lr()) << "group " << g;
    EXPECT_EQ(o.lr_decay(), t.lr_decay()) << "group " << g;
    EXPECT_EQ(o.weight_decay(), t.weight_decay()) << "group " << g;
    EXPECT_EQ(o.initial_accumulator_value(), t.initial_accumulator_value()) << "group " << g;
    EXPECT_EQ(o.eps(), t.eps()) << "group " << g;
  }
  EXPECT_EQ(static_cast<const FusedAdagradOptions&>(ours.param_groups()[1].options()).lr(), 0.2);
  // Invalid options are refused and the optimizer keeps its groups.
  expect_error([&] {
    ours.add_param_group(torch::optim::OptimizerParamGroup(
        {leaf()}, std::make_unique<FusedAdagradOptions>(FusedAdagradOptions(-3))));
  }, {"Invalid learning rate: -3"});
  EXPECT_EQ(ours.param_groups().size(), 3u);
}

// A bad tensor anywhere fails the whole step before any param, sum or step changes.
TEST(FailedStep, NothingChangesAndTheErrorNamesGroupAndParam) {
  torch::manual_seed(6);
  std::vector<torch::Tensor> g0{torch::randn({4, 3}, torch::requires_grad()),
                                torch::randn({3}, torch::requires_grad())};
  std::vector<torch::Tensor> g1{torch::randn({2}, torch::requires_grad()),
                                torch::randn({5}, torch::requires_grad()),
                                torch::randn({2, 2}, torch::requires_grad())};
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(g0);
  auto g1_options = FusedAdagradOptions(0.3).weight_decay(0.1).initial_accumulator_value(1);
  groups.emplace_back(g1, std::make_unique<FusedAdagradOptions>(g1_options));
  FusedAdagrad opt(groups, FusedAdagradOptions(0.1));
  std::vector<torch::Tensor> all = g0;
  all.insert(all.end(), g1.begin(), g1.end());
  auto fill_grads = [&] {
    for (auto& p : all) p.mutable_grad() = torch::randn_like(p);
  };
  for (int i = 0; i < 3; ++i) {
    fill_grads();
    opt.step();
  }

  auto expect_unchanged_after = [&](const std::function<void()>& break_it,
                                    const std::vector<std::string>& message) {
    fill_grads();
    break_it();
    const auto params_before = clones(all);
    std::vector<torch::Tensor> sums, steps;
    for (auto& p : all) {
      sums.push_back(fused_state(opt, p).sum());
      steps.push_back(fused_state(opt, p).step());
    }
    const auto sums_before = clones(sums);
    const auto steps_before = clones(steps);
    expect_error([&] { opt.step(); }, message);
    for (size_t i = 0; i < all.size(); ++i) {
      EXPECT_TRUE(torch::equal(all[i], params_before[i])) << "param " << i;
      EXPECT_TRUE(torch::equal(fused_state(opt, all[i]).sum(), sums_before[i])) << "sum " << i;
      EXPECT_TRUE(torch::equal(fused_state(opt, all[i]).step(), steps_before[i])) << "step " << i;
    }
  };
  expect_unchanged_after([&] { g1[2].mutable_grad() = torch::ones({3}); },
                         {"param group 1", "param 2", "shape"});
  expect_unchanged_after([&] { g0[1].mutable_grad() = torch::ones({3}, torch::kDouble); },
                         {"param group 0", "param 1", "dtype"});
  // State of the wrong shape, as a state loaded from another model would be.
  const torch::Tensor good_sum = fused_state(opt, g1[1]).sum();
  expect_unchanged_after([&] { fused_state(opt, g1[1]).sum(torch::zeros({7})); },
                         {"param group 1", "param 1", "state 'sum'"});
  fused_state(opt, g1[1]).sum(good_sum);

  // And the optimizer still works afterwards.
  fill_grads();
  const auto before = clones(all);
  opt.step();
  for (size_t i = 0; i < all.size(); ++i) EXPECT_FALSE(torch::equal(all[i], before[i]));
  EXPECT_EQ(fused_state(opt, all[4]).step().item<float>(), 4);
}

// A param without grad takes no step, as in torch.
TEST(Step, ParamsWithoutGradAreSkipped) {
  torch::Tensor a = torch::ones({3}, torch::requires_grad());
  torch::Tensor b = torch::ones({3}, torch::requires_grad());
  FusedAdagrad opt({a, b});
  a.mutable_grad() = torch::ones({3});
  opt.step();
  EXPECT_EQ(fused_state(opt, a).step().item<float>(), 1);
  EXPECT_EQ(fused_state(opt, b).step().item<float>(), 0);
  EXPECT_TRUE(torch::equal(b.detach(), torch::ones({3})));
  EXPECT_FALSE(torch::equal(a.detach(), torch::ones({3})));
}

}  // namespace
}  // namespace fused_adagrad::testing
