// Checkpoints between FusedAdagrad, RowWiseAdagrad and torch::optim::Adagrad: a job switches
// optimizers and resumes; archives that are truncated, corrupt or of the wrong optimizer raise
// and change nothing. Also the options overloads of the op entry points.
#include "test_util.h"

#include <cstdlib>
#include <functional>
#include <sstream>

namespace fused_adagrad::testing {
namespace {

// As tests/cpp/test_parity.cpp, and for the same reason: torch's sqrt (MKL's vsSqrt) is not
// correctly rounded on every CPU while ours is, so runs of the two optimizers drift by ulps.
constexpr double kRtol = 1e-5, kAtol = 1e-6;
constexpr int kSteps = 5;

// Every option away from its default (torch's five; ours add maximize and eps_inside_sqrt).
Hyper non_default() {
  Hyper h;
  h.lr = 0.05;
  h.lr_decay = 1e-3;
  h.weight_decay = 1e-2;
  h.initial_accumulator_value = 0.1;
  h.eps = 1e-8;
  return h;
}

torch::nn::Sequential clone_model(const torch::nn::Sequential& model) {
  return torch::nn::Sequential(
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone()));
}

template <typename Saved>
std::string save_to_string(const Saved& saved) {
  std::ostringstream out;
  torch::save(saved, out);
  return out.str();
}

template <typename Loaded>
void load_from_string(Loaded& loaded, const std::string& bytes) {
  std::istringstream in(bytes);
  torch::load(loaded, in);
}

const FusedAdagradOptions& fused_options(const FusedAdagrad& opt, size_t group = 0) {
  return static_cast<const FusedAdagradOptions&>(opt.param_groups()[group].options());
}

void expect_same_run(const std::vector<torch::Tensor>& ps, const std::vector<torch::Tensor>& qs) {
  ASSERT_EQ(ps.size(), qs.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::equal(ps[i], qs[i])) << "param " << i;
  }
}

// torch's Adagrad trains kSteps, is saved, and resumes as FusedAdagrad: the loaded state is
// torch's, bitwise (a float32 0-d step), and the next kSteps match torch's own continuation
// within the parity tolerance. A FusedAdagrad given torch's state by hand continues bitwise as
// the loaded one, so the conversion itself loses nothing.
TEST(Checkpoint, TorchAdagradResumesAsFusedAdagrad) {
  const Hyper h = non_default();
  const Data data = make_data();
  auto torch_model = make_model();
  torch::optim::Adagrad theirs(torch_model->parameters(), h.torch_options());
  for (int i = 0; i < kSteps; ++i) train_step(torch_model, theirs, data);
  const std::string bytes = save_to_string(theirs);

  auto model = clone_model(torch_model);
  // Options that the archive's replace: maximize and eps_inside_sqrt, which torch's archive
  // does not name, become false as torch's Adagrad computes.
  FusedAdagrad ours(model->parameters(),
                    FusedAdagradOptions(0.5).maximize(true).eps_inside_sqrt(true));
  load_from_string(ours, bytes);
  EXPECT_TRUE(fused_options(ours) == h.fused());

  auto control_model = clone_model(torch_model);
  FusedAdagrad control(control_model->parameters(), h.fused());
  const auto ps = model->parameters();
  const auto qs = torch_model->parameters();
  const auto cs = control_model->parameters();
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& st = fused_state(ours, ps[i]);
    EXPECT_TRUE(torch::equal(st.sum(), torch_state(theirs, qs[i]).sum())) << "param " << i;
    EXPECT_EQ(st.step().dim(), 0);
    EXPECT_EQ(st.step().scalar_type(), torch::kFloat);
    EXPECT_EQ(st.step().item<float>(), kSteps);
    fused_state(control, cs[i]).sum().copy_(torch_state(theirs, qs[i]).sum());
    fused_state(control, cs[i]).step().fill_(kSteps);
  }

  const torch::Tensor before = ps[0].detach().clone();
  for (int i = 0; i < kSteps; ++i) {
    train_step(torch_model, theirs, data);
    train_step(model, ours, data);
    train_step(control_model, control, data);
  }
  EXPECT_FALSE(torch::equal(ps[0], before));  // it did train on
  expect_same_run(ps, cs);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::allclose(ps[i], qs[i], kRtol, kAtol))
        << "param " << i << ", max abs diff " << (ps[i] - qs[i]).abs().max().item<double>();
    EXPECT_TRUE(torch::allclose(fused_state(ours, ps[i]).sum(), torch_state(theirs, qs[i]).sum(),
                                kRtol, kAtol))
        << "param " << i;
    EXPECT_EQ(fused_state(ours, ps[i]).step().item<float>(), torch_state(theirs, qs[i]).step());
  }
}

// The reverse: FusedAdagrad's archive is torch's Adagrad's own (int64 step, its options).
TEST(Checkpoint, FusedAdagradResumesAsTorchAdagrad) {
  const Hyper h = non_default();
  const Data data = make_data();
  auto model = make_model();
  FusedAdagrad ours(model->parameters(), h.fused());
  for (int i = 0; i < kSteps; ++i) train_step(model, ours, data);
  const std::string bytes = save_to_string(ours);

  auto torch_model = clone_model(model);
  torch::optim::Adagrad theirs(torch_model->parameters(), torch::optim::AdagradOptions(0.5));
  load_from_string(theirs, bytes);
  EXPECT_TRUE(static_cast<const torch::optim::AdagradOptions&>(
                  theirs.param_groups()[0].options()) == h.torch_options());

  auto control_model = clone_model(model);
  torch::optim::Adagrad control(control_model->parameters(), h.torch_options());
  const auto ps = model->parameters();
  const auto qs = torch_model->parameters();
  const auto cs = control_model->parameters();
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(torch_state(theirs, qs[i]).step(), kSteps);
    EXPECT_TRUE(torch::equal(torch_state(theirs, qs[i]).sum(), fused_state(ours, ps[i]).sum()))
        << "param " << i;
    torch_state(control, cs[i]).sum().copy_(fused_state(ours, ps[i]).sum());
    torch_state(control, cs[i]).step(kSteps);
  }

  const torch::Tensor before = qs[0].detach().clone();
  for (int i = 0; i < kSteps; ++i) {
    train_step(model, ours, data);
    train_step(torch_model, theirs, data);
    train_step(control_model, control, data);
  }
  EXPECT_FALSE(torch::equal(qs[0], before));
  expect_same_run(qs, cs);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::allclose(qs[i], ps[i], kRtol, kAtol))
        << "param " << i << ", max abs diff " << (qs[i] - ps[i]).abs().max().item<double>();
    EXPECT_EQ(torch_state(theirs, qs[i]).step(), fused_state(ours, ps[i]).step().item<float>());
  }
}

// What is in our archive: torch's entries, an int64 step, the writer's name, all seven options.
TEST(Checkpoint, FusedAdagradWritesTorchLayout) {
  torch::Tensor p = torch::ones({3}, torch::requires_grad());
  FusedAdagrad opt({p}, FusedAdagradOptions(0.1).maximize(true));
  p.mutable_grad() = torch::ones({3});
  opt.step();
  opt.step();
  std::istringstream in(save_to_string(opt));
  torch::serialize::InputArchive archive;
  archive.load_from(in);

  c10::IValue v;
  ASSERT_TRUE(archive.try_read("pytorch_version", v));
  EXPECT_EQ(v.toStringRef(), "1.5.0");
  ASSERT_TRUE(archive.try_read("fused_adagrad_optimizer", v));
  EXPECT_EQ(v.toStringRef(), "FusedAdagrad");
  torch::serialize::InputArchive states, entry;
  ASSERT_TRUE(archive.try_read("state", states));
  const auto keys = states.keys();
  ASSERT_EQ(keys.size(), 1u);
  ASSERT_TRUE(states.try_read(keys[0], entry));
  ASSERT_TRUE(entry.try_read("step", v));
  ASSERT_TRUE(v.isInt());
  EXPECT_EQ(v.toInt(), 2);
  torch::serialize::InputArchive groups, group, options;
  ASSERT_TRUE(archive.try_read("param_groups", groups));
  ASSERT_TRUE(groups.try_read("param_groups/0", group));
  ASSERT_TRUE(group.try_read("params/0", v));
  EXPECT_EQ(v.toStringRef(), keys[0]);
  ASSERT_TRUE(group.try_read("options", options));
  ASSERT_TRUE(options.try_read("maximize", v));
  EXPECT_TRUE(v.toBool());
  ASSERT_TRUE(options.try_read("lr", v));
  EXPECT_EQ(v.toDouble(), 0.1);
}

// Our own round trip stays exact, with two groups of their own options (maximize and
// eps_inside_sqrt, which torch lacks, included), a step the user replaced by one an int64 would
// not restore (written as its tensor), and a param of a group added later that never stepped
// (no state saved: it is created afresh at the next step, as in the saving optimizer).
TEST(Checkpoint, FusedAdagradRoundTripIsExact) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> ps0 = {torch::randn({5}), torch::randn({2, 3}), torch::randn({4})};
  auto ps = clones(ps0);
  for (auto& p : ps) p.requires_grad_(true);
  Hyper h = non_default();
  h.eps_inside_sqrt = true;
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{ps[0]});
  groups.emplace_back(std::vector<torch::Tensor>{ps[1]},
                      std::make_unique<FusedAdagradOptions>(
                          FusedAdagradOptions(0.2).maximize(true).initial_accumulator_value(0.3)));
  FusedAdagrad opt(groups, h.fused());
  for (int i = 0; i < 3; ++i) {
    ps[0].mutable_grad() = torch::randn({5});
    ps[1].mutable_grad() = torch::randn({2, 3});
    opt.step();
  }
  fused_state(opt, ps[1]).step(torch::full({}, 2.5, torch::kDouble));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {ps[2]}, std::make_unique<FusedAdagradOptions>(
                   FusedAdagradOptions(0.3).initial_accumulator_value(0.7))));
  const std::string bytes = save_to_string(opt);

  auto qs = clones(ps);
  for (auto& q : qs) q.requires_grad_(true);
  std::vector<torch::optim::OptimizerParamGroup> other;
  other.emplace_back(std::vector<torch::Tensor>{qs[0]});
  other.emplace_back(std::vector<torch::Tensor>{qs[1]});
  other.emplace_back(std::vector<torch::Tensor>{qs[2]});
  FusedAdagrad loaded(other, FusedAdagradOptions(0.9));
  fused_state(loaded, qs[2]).sum().fill_(42);  // stale state, which the load drops
  load_from_string(loaded, bytes);

  for (size_t g = 0; g < 3; ++g) {
    EXPECT_TRUE(fused_options(loaded, g) == fused_options(opt, g)) << "group " << g;
  }
  for (size_t i = 0; i < 2; ++i) {
    const auto& a = fused_state(opt, ps[i]);
    const auto& b = fused_state(loaded, qs[i]);
    EXPECT_TRUE(a == b) << "param " << i;
    EXPECT_EQ(b.step().scalar_type(), a.step().scalar_type()) << "param " << i;
    EXPECT_EQ(b.sum().scalar_type(), a.sum().scalar_type()) << "param " << i;
  }
  EXPECT_EQ(opt.state().count(ps[2].unsafeGetTensorImpl()), 0u);
  EXPECT_EQ(loaded.state().count(qs[2].unsafeGetTensorImpl()), 0u);

  for (int i = 0; i < 3; ++i) {
    torch::manual_seed(10 + i);
    for (size_t j = 0; j < 3; ++j) {
      const torch::Tensor g = torch::randn(ps[j].sizes());
      ps[j].mutable_grad() = g.clone();
      qs[j].mutable_grad() = g.clone();
    }
    opt.step();
    loaded.step();
  }
  expect_same_run(ps, qs);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(fused_state(opt, ps[i]) == fused_state(loaded, qs[i])) << "param " << i;
  }
  EXPECT_TRUE(torch::equal(fused_state(loaded, qs[2]).step(), torch::full({}, 3.0f)));
}

// Archives of FusedAdagrad before it wrote torch's int64 steps (torch's serializer over our
// state: float32 tensor steps, no writer name) still load.
TEST(Checkpoint, FusedAdagradLoadsItsEarlierLayout) {
  torch::Tensor p = torch::ones({3}, torch::requires_grad());
  FusedAdagrad opt({p}, FusedAdagradOptions(0.1).eps_inside_sqrt(true));
  p.mutable_grad() = torch::full({3}, 0.5);
  opt.step();
  torch::serialize::OutputArchive archive;
  torch::optim::serialize<FusedAdagradParamState, FusedAdagradOptions>(archive, opt);
  std::ostringstream out;
  archive.save_to(out);

  torch::Tensor q = p.detach().clone().requires_grad_(true);
  FusedAdagrad loaded({q});
  load_from_string(loaded, out.str());
  EXPECT_TRUE(fused_state(loaded, q) == fused_state(opt, p));
  EXPECT_TRUE(fused_options(loaded) == fused_options(opt));
}

// ---- archives that must not load ----------------------------------------------------------

// A copy of everything a load may change.
struct Snapshot {
  std::vector<torch::Tensor> params;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> states;  // (sum, step), undefined: none
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;
};

template <typename State>
Snapshot snapshot(torch::optim::Optimizer& opt) {
  Snapshot s;
  for (const auto& group : opt.param_groups()) {
    s.options.push_back(group.options().clone());
    for (const auto& p : group.params()) {
      s.params.push_back(p.detach().clone());
      const auto it = opt.state().find(p.unsafeGetTensorImpl());
      if (it == opt.state().end()) {
        s.states.emplace_back();
      } else {
        const auto& st = static_cast<const State&>(*it->second);
        s.states.emplace_back(st.sum().clone(), st.step().clone());
      }
    }
  }
  return s;
}

bool same_tensor(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  return !a.defined() || (a.scalar_type() == b.scalar_type() && a.device() == b.device() &&
                          a.sizes() == b.sizes() && torch::equal(a, b));
}

template <typename State, typename Options>
void expect_unchanged(torch::optim::Optimizer& opt, const Snapshot& before) {
  const Snapshot after = snapshot<State>(opt);
  ASSERT_EQ(after.params.size(), before.params.size());
  ASSERT_EQ(after.options.size(), before.options.size());
  for (size_t i = 0; i < before.params.size(); ++i) {
    EXPECT_TRUE(same_tensor(after.params[i], before.params[i])) << "param " << i;
    EXPECT_TRUE(same_tensor(after.states[i].first, before.states[i].first)) << "sum " << i;
    EXPECT_TRUE(same_tensor(after.states[i].second, before.states[i].second)) << "step " << i;
  }
  for (size_t g = 0; g < before.options.size(); ++g) {
    EXPECT_TRUE(static_cast<const Options&>(*after.options[g]) ==
                static_cast<const Options&>(*before.options[g]))
        << "options of group " << g;
  }
}

// An archive of torch's layout written entry by entry, so that one entry can be made wrong.
struct ParamEntry {
  c10::IValue sum, step;  // None: left out
  c10::IValue key;        // None: "1000" + index
};
struct GroupEntry {
  std::vector<ParamEntry> params;
  std::vector<std::pair<std::string, c10::IValue>> options;
};

std::vector<std::pair<std::string, c10::IValue>> torch_option_entries(double lr = 0.25) {
  return {{"lr", lr}, {"lr_decay", 0.0}, {"weight_decay", 0.0},
          {"initial_accumulator_value", 0.0}, {"eps", 1e-10}};
}

std::string write_archive(const std::vector<GroupEntry>& groups,
                          const c10::IValue& version = c10::IValue("1.5.0"),
                          const c10::IValue& writer = c10::IValue()) {
  torch::serialize::OutputArchive archive;
  if (!version.isNone()) archive.write("pytorch_version", version);
  if (!writer.isNone()) archive.write("fused_adagrad_optimizer", writer);
  torch::serialize::OutputArchive states(archive.compilation_unit());
  torch::serialize::OutputArchive groups_archive(archive.compilation_unit());
  groups_archive.write("param_groups/size", torch::tensor(static_cast<int64_t>(groups.size())));
  int index = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    torch::serialize::OutputArchive group(archive.compilation_unit());
    group.write("params/size", torch::tensor(static_cast<int64_t>(groups[g].params.size())));
    for (size_t j = 0; j < groups[g].params.size(); ++j) {
      const ParamEntry& e = groups[g].params[j];
      const std::string key = std::to_string(1000 + index++);
      torch::serialize::OutputArchive entry(archive.compilation_unit());
      if (!e.sum.isNone()) entry.write("sum", e.sum);
      if (!e.step.isNone()) entry.write("step", e.step);
      states.write(key, entry);
      group.write("params/" + std::to_string(j), e.key.isNone() ? c10::IValue(key) : e.key);
    }
    torch::serialize::OutputArchive options(archive.compilation_unit());
    for (const auto& [name, value] : groups[g].options) options.write(name, value);
    group.write("options", options);
    groups_archive.write("param_groups/" + std::to_string(g), group);
  }
  archive.write("state", states);
  archive.write("param_groups", groups_archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

// Two params, 3 and (2, 4): a valid torch-layout archive for them, its state unlike theirs.
GroupEntry valid_group() {
  return {{{c10::IValue(torch::full({3}, 7.0f)), c10::IValue(int64_t{9}), c10::IValue()},
           {c10::IValue(torch::full({2, 4}, 7.0f)), c10::IValue(int64_t{9}), c10::IValue()}},
          torch_option_entries()};
}

struct BadArchive {
  const char* name;
  std::function<std::string()> bytes;
  const char* message;  // part of the error
};

std::vector<BadArchive> bad_archives() {
  auto with = [](std::function<void(GroupEntry&)> edit) {
    return [edit] {
      GroupEntry g = valid_group();
      edit(g);
      return write_archive({g});
    };
  };
  return {
      {"truncated", [] { const std::string s = write_archive({valid_group()});
                         return s.substr(0, s.size() / 2); }, ""},
      {"not an archive", [] { return std::string("not a zip file at all"); }, ""},
      {"sum of another shape",
       with([](GroupEntry& g) { g.params[1].sum = torch::zeros({4, 2}); }),
       "param group 0, param 1: state 'sum' has shape [4, 2] but the parameter has shape [2, 4]"},
      {"sum of another dtype",
       with([](GroupEntry& g) { g.params[1].sum = torch::zeros({2, 4}, torch::kDouble); }),
       "state 'sum' has dtype Double"},
      {"sum not a tensor", with([](GroupEntry& g) { g.params[0].sum = 1.5; }),
       "'sum' is missing or not a tensor"},
      {"sum missing", with([](GroupEntry& g) { g.params[1].sum = c10::IValue(); }),
       "'sum' is missing or not a tensor"},
      {"step a string", with([](GroupEntry& g) { g.params[1].step = "9"; }),
       "'step' is missing or neither an int nor a tensor"},
      {"step negative", with([](GroupEntry& g) { g.params[1].step = int64_t{-1}; }),
       "param group 0, param 1: 'step' is -1"},
      {"step of two elements", with([](GroupEntry& g) { g.params[1].step = torch::zeros({2}); }),
       "state 'step' must be a one-element floating tensor"},
      {"step tensor negative",
       with([](GroupEntry& g) { g.params[1].step = torch::full({}, -2.0f); }),
       "a step count must be a non-negative number"},
      {"lr negative", with([](GroupEntry& g) { g.options[0].second = -0.5; }),
       "param group 0: Invalid learning rate: -0.5"},
      {"lr an int", with([](GroupEntry& g) { g.options[0].second = int64_t{1}; }),
       "'lr' must be a float, got Int"},
      {"eps missing", with([](GroupEntry& g) { g.options.pop_back(); }),
       "'eps' missing from the archive"},
      {"maximize without eps_inside_sqrt",
       with([](GroupEntry& g) { g.options.emplace_back("maximize", false); }),
       "'eps_inside_sqrt' missing from the archive"},
      {"one param too many",
       with([](GroupEntry& g) { g.params.push_back(g.params[0]); }),
       "param group 0 has 3 params, the optimizer's 2"},
      {"a key twice", with([](GroupEntry& g) { g.params[1].key = "1000"; }),
       "param group 0, param 1: its state key is another param's too"},
      {"a key not a string", with([](GroupEntry& g) { g.params[1].key = int64_t{1001}; }),
       "param group 0, param 1: its state key is missing"},
      {"two groups", [] { return write_archive({valid_group(), valid_group()}); },
       "it has 2 param groups, the optimizer 1"},
      {"another version", [] { return write_archive({valid_group()}, c10::IValue("1.4.0")); },
       "'pytorch_version' is 1.4.0"},
      {"a model, not an optimizer",
       [] { return save_to_string(torch::nn::Linear(2, 3)); }, "no 'pytorch_version' entry"},
  };
}

// The valid archive does load (so each bad one fails for its own flaw), and every bad one
// raises, naming the flaw, and changes no param, state or option.
TEST(Checkpoint, BadArchivesRaiseAndChangeNothing) {
  torch::manual_seed(6);
  torch::Tensor a = torch::randn({3}).requires_grad_(true);
  torch::Tensor b = torch::randn({2, 4}).requires_grad_(true);
  FusedAdagrad opt({a, b}, FusedAdagradOptions(0.1).maximize(true));
  for (int i = 0; i < 2; ++i) {
    a.mutable_grad() = torch::randn({3});
    b.mutable_grad() = torch::randn({2, 4});
    opt.step();
  }

  for (const BadArchive& bad : bad_archives()) {
    SCOPED_TRACE(bad.name);
    const Snapshot before = snapshot<FusedAdagradParamState>(opt);
    const std::string bytes = bad.bytes();
    EXPECT_THROW(load_from_string(opt, bytes), c10::Error);
    if (*bad.message != '\0') {
      expect_error([&] { load_from_string(opt, bytes); },
                   {"FusedAdagrad::load: cannot load the archive, the optimizer is unchanged",
                    bad.message});
    }
    expect_unchanged<FusedAdagradParamState, FusedAdagradOptions>(opt, before);
  }

  FusedAdagrad fresh({a.detach().clone().requires_grad_(true),
                      b.detach().clone().requires_grad_(true)});
  load_from_string(fresh, write_archive({valid_group()}));
  EXPECT_EQ(fused_options(fresh).lr(), 0.25);
  for (const auto& p : fresh.param_groups()[0].params()) {
    EXPECT_TRUE(torch::equal(fused_state(fresh, p).sum(), torch::full_like(p, 7)));
    EXPECT_EQ(fused_state(fresh, p).step().item<float>(), 9);
  }
}

// ---- RowWiseAdagrad -----------------------------------------------------------------------

// 1-d params, whose element-wise sums have the shape of row-wise ones: only the writer's name
// tells a FusedAdagrad or torch archive from RowWiseAdagrad's, and it is refused by it.
TEST(Checkpoint, RowWiseAdagradRefusesElementwiseArchives) {
  torch::manual_seed(7);
  const std::vector<torch::Tensor> ps0 = {torch::randn({4}), torch::randn({6})};
  auto train = [&](auto& opt, std::vector<torch::Tensor>& ps) {
    for (int i = 0; i < 2; ++i) {
      for (auto& p : ps) p.mutable_grad() = torch::ones_like(p);
      opt.step();
    }
  };
  auto ps = clones(ps0);
  for (auto& p : ps) p.requires_grad_(true);
  torch::optim::Adagrad theirs(ps, torch::optim::AdagradOptions(0.1));
  train(theirs, ps);
  auto fs = clones(ps0);
  for (auto& p : fs) p.requires_grad_(true);
  FusedAdagrad fused(fs, FusedAdagradOptions(0.1));
  train(fused, fs);

  auto rs = clones(ps0);
  for (auto& p : rs) p.requires_grad_(true);
  RowWiseAdagrad rowwise(rs, RowWiseAdagradOptions(0.3));
  train(rowwise, rs);
  const std::string rowwise_bytes = save_to_string(rowwise);

  const Snapshot before = snapshot<RowWiseAdagradParamState>(rowwise);
  expect_error([&] { load_from_string(rowwise, save_to_string(theirs)); },
               {"RowWiseAdagrad::load: cannot load the archive, the optimizer is unchanged",
                "not written by RowWiseAdagrad", "element-wise state does not load"});
  expect_unchanged<RowWiseAdagradParamState, RowWiseAdagradOptions>(rowwise, before);
  expect_error([&] { load_from_string(rowwise, save_to_string(fused)); },
               {"it was written by FusedAdagrad, whose state does not load into RowWiseAdagrad"});
  expect_unchanged<RowWiseAdagradParamState, RowWiseAdagradOptions>(rowwise, before);
  for (const BadArchive& bad : bad_archives()) {
    SCOPED_TRACE(bad.name);
    EXPECT_THROW(load_from_string(rowwise, bad.bytes()), c10::Error);
    expect_unchanged<RowWiseAdagradParamState, RowWiseAdagradOptions>(rowwise, before);
  }
  // Named RowWiseAdagrad, its state is checked as the row-wise step checks it.
  const c10::IValue name("RowWiseAdagrad");
  const auto options = torch_option_entries();
  const GroupEntry wrong_rows = {
      {{c10::IValue(torch::zeros({4})), c10::IValue(torch::zeros({})), {}},
       {c10::IValue(torch::zeros({5})), c10::IValue(torch::zeros({})), {}}},
      options};
  expect_error([&] { load_from_string(rowwise, write_archive({wrong_rows}, "1.5.0", name)); },
               {"param group 0, param 1: row-wise state 'sum' has shape [5]"});
  expect_unchanged<RowWiseAdagradParamState, RowWiseAdagradOptions>(rowwise, before);
  const GroupEntry other = {
      {{c10::IValue(torch::zeros({4})), c10::IValue(int64_t{1}), {}},
       {c10::IValue(torch::zeros({6}, torch::kDouble)), c10::IValue(int64_t{1}), {}}},
      options};
  expect_error([&] { load_from_string(rowwise, write_archive({other}, "1.5.0", name)); },
               {"row-wise state 'sum' has dtype Double but a Float parameter needs Float"});
  expect_unchanged<RowWiseAdagradParamState, RowWiseAdagradOptions>(rowwise, before);

  // The other way round: FusedAdagrad names the writer, torch's Adagrad finds a tensor step
  // where its int64 goes. Neither changes.
  const Snapshot fused_before = snapshot<FusedAdagradParamState>(fused);
  expect_error([&] { load_from_string(fused, rowwise_bytes); },
               {"it was written by RowWiseAdagrad, whose state does not load into FusedAdagrad"});
  expect_unchanged<FusedAdagradParamState, FusedAdagradOptions>(fused, fused_before);
  const torch::Tensor torch_sum = torch_state(theirs, ps[0]).sum().clone();
  EXPECT_THROW(load_from_string(theirs, rowwise_bytes), c10::Error);
  EXPECT_TRUE(torch::equal(torch_state(theirs, ps[0]).sum(), torch_sum));

  // Its own archive loads, as tests/cpp/test_rowwise.cpp checks in full.
  auto qs = clones(rs);
  for (auto& q : qs) q.requires_grad_(true);
  RowWiseAdagrad reloaded(qs);
  load_from_string(reloaded, rowwise_bytes);
  for (size_t i = 0; i < qs.size(); ++i) {
    EXPECT_TRUE(static_cast<const RowWiseAdagradParamState&>(
                    *reloaded.state().at(qs[i].unsafeGetTensorImpl())) ==
                static_cast<const RowWiseAdagradParamState&>(
                    *rowwise.state().at(rs[i].unsafeGetTensorImpl())))
        << "param " << i;
  }
}

// ---- CUDA ---------------------------------------------------------------------------------

// A torch archive of CUDA params: the int64 step becomes a float32 0-d tensor on the param's
// device, as FusedAdagrad creates it (so CUDA graphs can capture the step). Skips without a GPU
// unless FUSED_ADAGRAD_REQUIRE_CUDA=1, as tests/cpp/test_cuda.cpp.
TEST(Checkpoint, CudaTorchArchiveStepOnParamDevice) {
  const char* required = std::getenv("FUSED_ADAGRAD_REQUIRE_CUDA");
  const bool usable = torch::cuda::is_available() && build_info().cuda;
  if (!usable && required != nullptr && std::string(required) == "1") {
    FAIL() << "no CUDA device or fused_adagrad built without CUDA (FUSED_ADAGRAD_REQUIRE_CUDA=1)";
  }
  if (!usable) GTEST_SKIP() << "no CUDA device or fused_adagrad built without CUDA";

  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  torch::manual_seed(8);
  torch::Tensor p = torch::randn({257}, cuda).requires_grad_(true);
  torch::optim::Adagrad theirs({p}, torch::optim::AdagradOptions(0.1).lr_decay(0.01));
  for (int i = 0; i < 3; ++i) {
    p.mutable_grad() = torch::randn({257}, cuda);
    theirs.step();
  }
  torch::Tensor q = p.detach().clone().requires_grad_(true);
  FusedAdagrad ours({q});
  load_from_string(ours, save_to_string(theirs));
  const auto& st = fused_state(ours, q);
  EXPECT_EQ(st.step().device(), q.device());
  EXPECT_EQ(st.step().scalar_type(), torch::kFloat);
  EXPECT_EQ(st.step().item<float>(), 3);
  EXPECT_TRUE(torch::equal(st.sum(), torch_state(theirs, p).sum()));

  const torch::Tensor g = torch::randn({257}, cuda);
  p.mutable_grad() = g.clone();
  q.mutable_grad() = g.clone();
  theirs.step();
  ours.step();
  EXPECT_TRUE(torch::allclose(q, p, kRtol, kAtol));
  EXPECT_EQ(st.step().item<float>(), 4);
}

// ---- the op entry points with options -----------------------------------------------------

struct OpInputs {
  std::vector<torch::Tensor> params, sums, steps;
  OptionalTensorList grads;
};

OpInputs op_inputs(bool rowwise) {
  torch::manual_seed(9);
  OpInputs in;
  const std::vector<std::vector<int64_t>> shapes = {{1027}, {33, 7}};
  for (const auto& shape : shapes) {
    in.params.push_back(torch::randn(shape));
    in.grads.push_back(torch::randn(shape));
    in.sums.push_back(rowwise ? torch::rand({shape[0]}) : torch::rand(shape));
    in.steps.push_back(torch::full({}, 4.0f));
  }
  return in;
}

OpInputs copy(const OpInputs& in) {
  OpInputs out;
  out.params = clones(in.params);
  out.sums = clones(in.sums);
  out.steps = clones(in.steps);
  for (size_t i = 0; i < in.grads.size(); ++i) out.grads.push_back(in.grads.get(i)->clone());
  return out;
}

void expect_same_inputs(const OpInputs& a, const OpInputs& b) {
  for (size_t i = 0; i < a.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(a.params[i], b.params[i])) << "param " << i;
    EXPECT_TRUE(torch::equal(a.sums[i], b.sums[i])) << "sum " << i;
    EXPECT_TRUE(torch::equal(a.steps[i], b.steps[i])) << "step " << i;
  }
}

// Each option a value of its own, so that two swapped fields would show; with and without an
// lr tensor. Three steps, so that lr_decay acts, bitwise the positional call's result; and
// unlike the defaults', so the options were not ignored.
template <typename Options, typename ByOptions, typename ByPosition>
void expect_options_overload_matches(bool rowwise, ByOptions by_options, ByPosition by_position) {
  const Options o = Options(0.05).lr_decay(0.1).weight_decay(0.02).eps(0.3).maximize(true)
                        .eps_inside_sqrt(true).initial_accumulator_value(0.7);
  for (const bool with_lr_tensor : {false, true}) {
    SCOPED_TRACE(with_lr_tensor ? "lr tensor" : "lr");
    const std::optional<at::Tensor> lr_tensor =
        with_lr_tensor ? std::optional<at::Tensor>(torch::full({}, 0.04)) : std::nullopt;
    const OpInputs start = op_inputs(rowwise);
    OpInputs a = copy(start), b = copy(start), d = copy(start);
    for (int i = 0; i < 3; ++i) {
      by_options(a, o, lr_tensor);
      by_position(b, o.lr(), o.lr_decay(), o.weight_decay(), o.eps(), o.maximize(),
                  o.eps_inside_sqrt(), lr_tensor);
      by_options(d, Options(), lr_tensor);
    }
    expect_same_inputs(a, b);
    EXPECT_EQ(a.steps[0].item<float>(), 7);
    EXPECT_FALSE(torch::equal(a.params[0], d.params[0]));
  }
}

TEST(OpOptions, AdagradStepMatchesPositional) {
  expect_options_overload_matches<FusedAdagradOptions>(
      false,
      [](OpInputs& in, const FusedAdagradOptions& o, const std::optional<at::Tensor>& lr) {
        adagrad_step_(in.params, in.grads, in.sums, in.steps, o, lr);
      },
      [](OpInputs& in, double lr, double lr_decay, double wd, double eps, bool maximize,
         bool inside, const std::optional<at::Tensor>& lr_tensor) {
        adagrad_step_(in.params, in.grads, in.sums, in.steps, lr, lr_decay, wd, eps, maximize,
                      inside, lr_tensor);
      });
}

TEST(OpOptions, RowWiseAdagradStepMatchesPositional) {
  expect_options_overload_matches<RowWiseAdagradOptions>(
      true,
      [](OpInputs& in, const RowWiseAdagradOptions& o, const std::optional<at::Tensor>& lr) {
        rowwise_adagrad_step_(in.params, in.grads, in.sums, in.steps, o, lr);
      },
      [](OpInputs& in, double lr, double lr_decay, double wd, double eps, bool maximize,
         bool inside, const std::optional<at::Tensor>& lr_tensor) {
        rowwise_adagrad_step_(in.params, in.grads, in.sums, in.steps, lr, lr_decay, wd, eps,
                              maximize, inside, lr_tensor);
      });
}

}  // namespace
}  // namespace fused_adagrad::testing
