// FusedEmbeddingBags, the LibTorch module whose backward is its tables' Adagrad step: bitwise
// parity with torch::nn::EmbeddingBag(sparse) tables stepped by FusedAdagrad / RowWiseAdagrad, a
// training loop, refused batches and backwards, the lr option, and save/load.
#include "test_util.h"

#include <optional>
#include <ostream>
#include <sstream>

namespace fused_adagrad::testing {
namespace {

constexpr int64_t kBatch = 6;

// Dims no SIMD width divides. With padding, table 0's row 1 and table 1's row 2 (counted from the
// end, as nn::EmbeddingBag counts a negative padding_idx) are padding.
std::vector<EmbeddingTable> three_tables(bool padding) {
  std::vector<EmbeddingTable> tables = {{50, 8}, {7, 3}, {1000, 17}};
  if (padding) {
    tables[0].padding_idx = 1;
    tables[1].padding_idx = -5;
  }
  return tables;
}

RowWiseAdagradOptions rowwise_options(const Hyper& h) {
  return RowWiseAdagradOptions(h.lr).lr_decay(h.lr_decay).weight_decay(h.weight_decay)
      .initial_accumulator_value(h.initial_accumulator_value).eps(h.eps).maximize(h.maximize)
      .eps_inside_sqrt(h.eps_inside_sqrt);
}

FusedEmbeddingBagsOptions bags_options(std::vector<EmbeddingTable> tables, const Hyper& h,
                                       bool rowwise, torch::Dtype dtype = torch::kFloat) {
  return FusedEmbeddingBagsOptions(std::move(tables)).rowwise(rowwise).lr(h.lr)
      .lr_decay(h.lr_decay).weight_decay(h.weight_decay)
      .initial_accumulator_value(h.initial_accumulator_value).eps(h.eps).maximize(h.maximize)
      .eps_inside_sqrt(h.eps_inside_sqrt).dtype(dtype);
}

// A batch in the module's layout (every table's ids, table after table; kBatch offsets per table)
// and split into each table's own nn::EmbeddingBag input.
struct Batch {
  torch::Tensor indices, offsets, per_sample_weights;
  std::vector<torch::Tensor> table_indices, table_offsets, table_weights;
};

// Bags of 0..4 random ids; in every table bags 0 and 3 start with id 1 (repeated, and table 0's
// padding row in the padding cases) and bag 2 is empty. Tables of under 11 rows draw from rows
// 0..2 only (their padding row 2 included), so ids repeat within and across bags. The bags of
// `skip_table` are all empty. per_sample_weights when psw_dtype is given.
Batch make_batch(const std::vector<EmbeddingTable>& tables, bool include_last_offset,
                 std::optional<torch::Dtype> psw_dtype = std::nullopt, int64_t skip_table = -1) {
  Batch b;
  std::vector<int64_t> all_ids, all_offsets;
  for (size_t t = 0; t < tables.size(); ++t) {
    std::vector<int64_t> ids, offsets;
    for (int64_t bag = 0; bag < kBatch; ++bag) {
      offsets.push_back(static_cast<int64_t>(ids.size()));
      if (static_cast<int64_t>(t) == skip_table || bag == 2) continue;
      if (bag == 0 || bag == 3) ids.push_back(1);
      const int64_t n = torch::randint(0, 5, {1}).item<int64_t>();
      const int64_t high = tables[t].rows > 10 ? tables[t].rows : 3;
      for (int64_t k = 0; k < n; ++k) ids.push_back(torch::randint(0, high, {1}).item<int64_t>());
    }
    for (int64_t o : offsets) all_offsets.push_back(static_cast<int64_t>(all_ids.size()) + o);
    all_ids.insert(all_ids.end(), ids.begin(), ids.end());
    if (include_last_offset) offsets.push_back(static_cast<int64_t>(ids.size()));
    b.table_indices.push_back(torch::tensor(ids, torch::kLong));
    b.table_offsets.push_back(torch::tensor(offsets, torch::kLong));
  }
  if (include_last_offset) all_offsets.push_back(static_cast<int64_t>(all_ids.size()));
  b.indices = torch::tensor(all_ids, torch::kLong);
  b.offsets = torch::tensor(all_offsets, torch::kLong);
  if (psw_dtype) b.per_sample_weights = torch::rand({b.indices.numel()}).to(*psw_dtype);
  int64_t begin = 0;
  for (const torch::Tensor& ids : b.table_indices) {
    b.table_weights.push_back(
        psw_dtype ? b.per_sample_weights.narrow(0, begin, ids.numel()) : torch::Tensor());
    begin += ids.numel();
  }
  return b;
}

// The unfused twin of a FusedEmbeddingBags: one nn::EmbeddingBag(sparse) per table holding the
// module's weights, stepped by FusedAdagrad (RowWiseAdagrad for a row-wise module).
struct Reference {
  bool rowwise;
  std::vector<torch::nn::EmbeddingBag> bags;
  std::unique_ptr<torch::optim::Optimizer> opt;

  Reference(const FusedEmbeddingBags& fused, const Hyper& h) : rowwise(fused->options.rowwise()) {
    const FusedEmbeddingBagsOptions& o = fused->options;
    std::vector<torch::Tensor> params;
    for (size_t t = 0; t < o.tables().size(); ++t) {
      const EmbeddingTable& table = o.tables()[t];
      auto options = torch::nn::EmbeddingBagOptions(table.rows, table.dim).mode(o.mode())
          .sparse(true).include_last_offset(o.include_last_offset());
      if (table.padding_idx) options.padding_idx(*table.padding_idx);
      torch::nn::EmbeddingBag bag(options);
      bag->to(o.dtype());
      {
        torch::NoGradGuard no_grad;
        bag->weight.copy_(fused->weights[t]);
      }
      params.push_back(bag->weight);
      bags.push_back(bag);
    }
    if (rowwise) {
      opt = std::make_unique<RowWiseAdagrad>(params, rowwise_options(h));
    } else {
      opt = std::make_unique<FusedAdagrad>(params, h.fused());
    }
  }

  torch::Tensor forward(const Batch& b) {
    std::vector<torch::Tensor> pooled;
    for (size_t t = 0; t < bags.size(); ++t) {
      pooled.push_back(bags[t](b.table_indices[t], b.table_offsets[t], b.table_weights[t]));
    }
    return torch::cat(pooled, 1);
  }
  void step(const torch::Tensor& loss) {
    opt->zero_grad();
    loss.backward();
    for (const auto& bag : bags) EXPECT_TRUE(bag->weight.grad().is_sparse());
    opt->step();
  }
  torch::optim::OptimizerParamState& state(size_t t) const {
    return *opt->state().at(bags[t]->weight.unsafeGetTensorImpl());
  }
  torch::Tensor sum(size_t t) const {
    return rowwise ? static_cast<RowWiseAdagradParamState&>(state(t)).sum()
                   : static_cast<FusedAdagradParamState&>(state(t)).sum();
  }
  torch::Tensor step_count(size_t t) const {
    return rowwise ? static_cast<RowWiseAdagradParamState&>(state(t)).step()
                   : static_cast<FusedAdagradParamState&>(state(t)).step();
  }
};

// One batch through both: equal forwards, then each one's step on the same loss.
void train_both(FusedEmbeddingBags& fused, Reference& ref, const Batch& b, const std::string& where) {
  const torch::Tensor out = fused(b.indices, b.offsets, b.per_sample_weights);
  const torch::Tensor expected = ref.forward(b);
  EXPECT_TRUE(torch::equal(out, expected)) << where << ": forward differs";
  const torch::Tensor target = torch::randn(out.sizes()).to(out.scalar_type());
  (out * target).sum().backward();
  ref.step((expected * target).sum());
}

void expect_same_tables(const FusedEmbeddingBags& fused, const Reference& ref) {
  for (size_t t = 0; t < ref.bags.size(); ++t) {
    EXPECT_FALSE(fused->weights[t].grad().defined()) << "table " << t;
    EXPECT_TRUE(torch::equal(fused->weights[t], ref.bags[t]->weight))
        << "table " << t << ": max diff "
        << (fused->weights[t] - ref.bags[t]->weight).abs().max().item<double>();
    EXPECT_TRUE(torch::equal(fused->sums[t], ref.sum(t))) << "table " << t << ": sums differ";
    EXPECT_TRUE(torch::equal(fused->steps[t], ref.step_count(t))) << "table " << t << ": steps";
  }
}

struct BagsCase {
  std::string name;
  torch::Dtype dtype;
  bool rowwise;
  bool mean = false, padding = false, psw = false, include_last_offset = false;
  Hyper h;
};

std::vector<BagsCase> bags_cases() {
  Hyper options;
  options.lr = 0.05;
  options.lr_decay = 0.1;
  options.maximize = true;
  options.eps_inside_sqrt = true;
  options.initial_accumulator_value = 0.1;
  options.eps = 1e-6;
  Hyper decay;
  decay.lr = 0.05;
  decay.weight_decay = 0.1;
  std::vector<BagsCase> cases;
  const std::pair<torch::Dtype, const char*> dtypes[] = {
      {torch::kFloat, "Float"}, {torch::kDouble, "Double"}, {torch::kBFloat16, "BFloat16"},
      {torch::kHalf, "Half"}};
  for (bool rowwise : {false, true}) {
    const std::string opt = rowwise ? "RowWise" : "Adagrad";
    for (const auto& [dtype, name] : dtypes) {
      const std::string n = opt + name;
      cases.push_back({n + "Sum", dtype, rowwise});
      cases.push_back({n + "MeanPadding", dtype, rowwise, /*mean=*/true, /*padding=*/true});
      cases.push_back({n + "SumWeightsLastOffsetOptions", dtype, rowwise, false, false,
                       /*psw=*/true, /*include_last_offset=*/true, options});
      if (rowwise) {
        cases.push_back({n + "MeanPaddingWeightDecay", dtype, rowwise, true, true, false, false,
                         decay});
      }
    }
  }
  return cases;
}

void PrintTo(const BagsCase& c, std::ostream* os) { *os << c.name; }

class EmbeddingBagsParity : public ::testing::TestWithParam<BagsCase> {};

// Five batches, the third of which leaves table 1 untouched (it still counts a step, as the
// reference's empty sparse grad does): forwards equal at every step, then the tables, sums and
// steps equal at the end, and no table has a grad.
TEST_P(EmbeddingBagsParity, BitwiseEqualToEmbeddingBagsSteppedByOurOptimizer) {
  const BagsCase& c = GetParam();
  const auto tables = three_tables(c.padding);
  torch::manual_seed(0);
  FusedEmbeddingBags fused(bags_options(tables, c.h, c.rowwise, c.dtype)
                               .mode(c.mean ? torch::nn::EmbeddingBagMode(torch::kMean)
                                            : torch::nn::EmbeddingBagMode(torch::kSum))
                               .include_last_offset(c.include_last_offset));
  Reference ref(fused, c.h);
  const auto initial = clones(fused->weights);
  for (int64_t s = 0; s < 5; ++s) {
    const Batch b = make_batch(tables, c.include_last_offset,
                               c.psw ? std::optional<torch::Dtype>(c.dtype) : std::nullopt,
                               s == 2 ? 1 : -1);
    train_both(fused, ref, b, "step " + std::to_string(s));
  }
  expect_same_tables(fused, ref);
  EXPECT_EQ(fused->updates(), 5);
  for (size_t t = 0; t < tables.size(); ++t) {
    EXPECT_EQ(fused->steps[t].item<double>(), 5) << "table " << t;
    EXPECT_FALSE(torch::equal(fused->weights[t], initial[t])) << "table " << t << " never stepped";
    EXPECT_EQ(fused->sums[t].scalar_type(),
              c.rowwise && c.dtype != torch::kDouble ? torch::kFloat : c.dtype);
  }
  if (c.padding) {
    EXPECT_TRUE(torch::equal(fused->weights[0][1], torch::zeros({8}, c.dtype)));
    EXPECT_TRUE(torch::equal(fused->weights[1][2], torch::zeros({3}, c.dtype)));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, EmbeddingBagsParity, ::testing::ValuesIn(bags_cases()),
                         [](const ::testing::TestParamInfo<BagsCase>& info) {
                           return info.param.name;
                         });

// Two tables and a Linear head fit a planted target: y = head*(pooled true tables), 2 ids a bag.
TEST(FusedEmbeddingBags, TrainingLoopWithLinearHeadFits) {
  torch::manual_seed(3);
  const std::vector<EmbeddingTable> tables = {{100, 8}, {20, 4}};
  const int64_t examples = 512, ids_per_bag = 2;
  const std::vector<torch::Tensor> ids = {torch::randint(0, 100, {examples, ids_per_bag}),
                                          torch::randint(0, 20, {examples, ids_per_bag})};
  const std::vector<torch::Tensor> planted = {torch::randn({100, 8}), torch::randn({20, 4})};
  const torch::Tensor planted_head = torch::randn({12, 1});
  const torch::Tensor y =
      torch::cat({planted[0].index({ids[0]}).mean(1), planted[1].index({ids[1]}).mean(1)}, 1)
          .matmul(planted_head);

  // Rows `rows` of the data set, in the module's layout: fixed-size bags.
  auto batch = [&](const torch::Tensor& rows) {
    const torch::Tensor indices = torch::cat({ids[0].index({rows}).flatten(),
                                              ids[1].index({rows}).flatten()});
    return std::make_pair(indices, torch::arange(0, indices.numel(), ids_per_bag));
  };
  FusedEmbeddingBags bags(FusedEmbeddingBagsOptions(tables).mode(torch::kMean).lr(0.2));
  torch::nn::Linear head(12, 1);
  FusedAdagrad opt(head->parameters(), FusedAdagradOptions(0.05));
  auto loss_on_all = [&] {
    torch::NoGradGuard no_grad;
    const auto [indices, offsets] = batch(torch::arange(examples));
    return torch::mse_loss(head(bags(indices, offsets)), y).item<double>();
  };

  const double initial = loss_on_all();
  const int64_t steps = 150;
  for (int64_t s = 0; s < steps; ++s) {
    const torch::Tensor rows = torch::randint(0, examples, {64});
    const auto [indices, offsets] = batch(rows);
    opt.zero_grad();
    torch::mse_loss(head(bags(indices, offsets)), y.index({rows})).backward();  // steps the tables
    opt.step();
  }
  const double final_loss = loss_on_all();
  EXPECT_LT(final_loss, 0.01 * initial) << "initial " << initial << ", final " << final_loss;
  EXPECT_EQ(bags->updates(), steps);
  for (const auto& w : bags->weights) EXPECT_FALSE(w.grad().defined());
}

struct Snapshot {
  std::vector<torch::Tensor> weights, sums, steps;
  int64_t updates;
};
Snapshot snapshot(const FusedEmbeddingBags& m) {
  return {clones(m->weights), clones(m->sums), clones(m->steps), m->updates()};
}
void expect_unchanged(const FusedEmbeddingBags& m, const Snapshot& before) {
  for (size_t t = 0; t < before.weights.size(); ++t) {
    EXPECT_TRUE(torch::equal(m->weights[t], before.weights[t])) << "table " << t;
    EXPECT_TRUE(torch::equal(m->sums[t], before.sums[t])) << "sum of table " << t;
    EXPECT_TRUE(torch::equal(m->steps[t], before.steps[t])) << "step of table " << t;
  }
  EXPECT_EQ(m->updates(), before.updates);
}

// Three tables of 50, 7 and 3 rows, one step taken (so that the state is not all zeros), and a
// valid batch of 2 bags a table, one id each.
struct ErrorsFixture {
  FusedEmbeddingBags m{FusedEmbeddingBagsOptions({{50, 4}, {7, 4}, {3, 4}}).lr(0.1)};
  const torch::Tensor offsets = torch::arange(6);
  const torch::Tensor valid = torch::tensor(std::vector<int64_t>{1, 2, 6, 0, 1, 2});
  ErrorsFixture() {
    m(valid, offsets).square().sum().backward();
    EXPECT_EQ(m->updates(), 1);
  }
};

TEST(FusedEmbeddingBags, OutOfRangeAndNegativeIdsAreRefusedNamingThem) {
  ErrorsFixture f;
  const Snapshot before = snapshot(f.m);
  expect_error([&] { f.m(torch::tensor(std::vector<int64_t>{1, 2, 7, 0, 1, 2}), f.offsets); },
               {"table 1, bag 0: id 7 (position 2 of indices)", "table of 7 rows"});
  expect_unchanged(f.m, before);
  expect_error([&] { f.m(torch::tensor(std::vector<int64_t>{1, 2, 6, 0, 1, -3}), f.offsets); },
               {"table 2, bag 1: id -3 (position 5 of indices)"});
  expect_unchanged(f.m, before);
  // The module still steps afterwards.
  f.m(f.valid, f.offsets).sum().backward();
  EXPECT_EQ(f.m->updates(), 2);
  EXPECT_FALSE(torch::equal(f.m->weights[0], before.weights[0]));
}

TEST(FusedEmbeddingBags, SecondBackwardThroughOneForwardIsRefused) {
  ErrorsFixture f;
  const Snapshot initial = snapshot(f.m);
  torch::Tensor loss = f.m(f.valid, f.offsets).square().sum();
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_EQ(f.m->updates(), 2);
  EXPECT_FALSE(torch::equal(f.m->weights[2], initial.weights[2]));
  const Snapshot before = snapshot(f.m);
  expect_error([&] { loss.backward(); }, {"FusedEmbeddingBags: a second backward"});
  expect_unchanged(f.m, before);
}

TEST(FusedEmbeddingBags, BackwardAfterAnotherBackwardsUpdateIsRefused) {
  ErrorsFixture f;
  const torch::Tensor first = f.m(f.valid, f.offsets);
  const torch::Tensor second = f.m(f.valid.flip(0), f.offsets);
  first.sum().backward();
  EXPECT_EQ(f.m->updates(), 2);
  const Snapshot before = snapshot(f.m);
  expect_error([&] { second.sum().backward(); },
               {"FusedEmbeddingBags: the tables were updated by another backward"});
  expect_unchanged(f.m, before);
}

// options.lr(...) between steps is used from the next step on, as the reference optimizer's
// group lr is; the run differs from one at the constant lr.
TEST(FusedEmbeddingBags, ChangingTheLrChangesTheUpdate) {
  for (bool rowwise : {false, true}) {
    SCOPED_TRACE(rowwise ? "row-wise" : "element-wise");
    Hyper h;
    h.lr = 0.1;
    h.lr_decay = 0.05;
    const auto tables = three_tables(false);
    torch::manual_seed(0);
    FusedEmbeddingBags fused(bags_options(tables, h, rowwise));
    torch::manual_seed(0);
    FusedEmbeddingBags constant(bags_options(tables, h, rowwise));
    Reference ref(fused, h);
    const double lrs[] = {0.1, 0.1, 0.5, 0.5, 0.02, 0.02};
    for (int64_t s = 0; s < 6; ++s) {
      fused->options.lr(lrs[s]);
      ref.opt->param_groups()[0].options().set_lr(lrs[s]);
      const Batch b = make_batch(tables, false);
      const torch::Tensor out = fused(b.indices, b.offsets);
      const torch::Tensor expected = ref.forward(b);
      const torch::Tensor at_constant_lr = constant(b.indices, b.offsets);
      EXPECT_TRUE(torch::equal(out, expected)) << "step " << s;
      // The same until the first change of lr has had a step to act.
      EXPECT_EQ(torch::equal(out, at_constant_lr), s <= 2) << "step " << s;
      const torch::Tensor target = torch::randn(out.sizes());
      (out * target).sum().backward();
      ref.step((expected * target).sum());
      (at_constant_lr * target).sum().backward();
    }
    expect_same_tables(fused, ref);
    for (size_t t = 0; t < tables.size(); ++t) {
      EXPECT_FALSE(torch::equal(fused->weights[t], constant->weights[t])) << "table " << t;
    }
  }
}

// torch::save / torch::load of the module carry the tables and their state (buffers); training
// then continues exactly as in the module that was saved.
TEST(FusedEmbeddingBags, SaveLoadContinuesIdentically) {
  for (bool rowwise : {false, true}) {
    SCOPED_TRACE(rowwise ? "row-wise" : "element-wise");
    Hyper h;
    h.lr = 0.05;
    h.lr_decay = 0.01;
    h.initial_accumulator_value = 0.1;
    h.eps_inside_sqrt = true;
    const auto tables = three_tables(true);
    const auto options = bags_options(tables, h, rowwise).mode(torch::kMean);
    torch::manual_seed(0);
    FusedEmbeddingBags saved(options);
    for (int64_t s = 0; s < 3; ++s) {
      const Batch b = make_batch(tables, false);
      saved(b.indices, b.offsets).square().sum().backward();
    }
    std::stringstream buffer;
    torch::save(saved, buffer);

    torch::manual_seed(1);
    FusedEmbeddingBags loaded(options);
    ASSERT_FALSE(torch::equal(loaded->weights[0], saved->weights[0]));
    torch::load(loaded, buffer);
    EXPECT_EQ(loaded->buffers().size(), 2 * tables.size());
    for (size_t t = 0; t < tables.size(); ++t) {
      EXPECT_TRUE(torch::equal(loaded->weights[t], saved->weights[t])) << "table " << t;
      EXPECT_TRUE(torch::equal(loaded->sums[t], saved->sums[t])) << "sum of table " << t;
      EXPECT_TRUE(torch::equal(loaded->steps[t], saved->steps[t])) << "step of table " << t;
      EXPECT_EQ(loaded->steps[t].item<double>(), 3);
      EXPECT_TRUE(loaded->weights[t].requires_grad());
    }
    for (int64_t s = 0; s < 4; ++s) {
      const Batch b = make_batch(tables, false);
      const torch::Tensor a = saved(b.indices, b.offsets);
      const torch::Tensor c = loaded(b.indices, b.offsets);
      EXPECT_TRUE(torch::equal(a, c)) << "step " << s;
      a.square().sum().backward();
      c.square().sum().backward();
    }
    for (size_t t = 0; t < tables.size(); ++t) {
      EXPECT_TRUE(torch::equal(loaded->weights[t], saved->weights[t])) << "table " << t;
      EXPECT_TRUE(torch::equal(loaded->sums[t], saved->sums[t])) << "sum of table " << t;
      EXPECT_EQ(loaded->steps[t].item<double>(), 7);
    }
  }
}

}  // namespace
}  // namespace fused_adagrad::testing
