// Helpers shared by the GoogleTest files: a small model, a reference Adagrad written with tensor
// ops, ulp distances, and access to both optimizers' state.
#pragma once

#include <fused_adagrad/fused_adagrad.h>

#include <ATen/Version.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace fused_adagrad::testing {

struct Hyper {
  double lr = 1e-2, lr_decay = 0, weight_decay = 0, initial_accumulator_value = 0, eps = 1e-10;
  bool maximize = false, eps_inside_sqrt = false;

  FusedAdagradOptions fused() const {
    return FusedAdagradOptions(lr).lr_decay(lr_decay).weight_decay(weight_decay)
        .initial_accumulator_value(initial_accumulator_value).eps(eps).maximize(maximize)
        .eps_inside_sqrt(eps_inside_sqrt);
  }
  torch::optim::AdagradOptions torch_options() const {
    return torch::optim::AdagradOptions(lr).lr_decay(lr_decay).weight_decay(weight_decay)
        .initial_accumulator_value(initial_accumulator_value).eps(eps);
  }
};

inline FusedAdagradParamState& fused_state(FusedAdagrad& opt, const torch::Tensor& p) {
  return static_cast<FusedAdagradParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
}
inline torch::optim::AdagradParamState& torch_state(torch::optim::Adagrad& opt,
                                                    const torch::Tensor& p) {
  return static_cast<torch::optim::AdagradParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
}

// Linear-Tanh-Linear on a fixed regression problem; the same seed gives the same weights.
inline torch::nn::Sequential make_model(torch::Dtype dtype = torch::kFloat) {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(4, 16), torch::nn::Tanh(),
                              torch::nn::Linear(16, 1));
  model->to(dtype);
  return model;
}

struct Data {
  torch::Tensor x, y;
};
inline Data make_data(torch::Dtype dtype = torch::kFloat) {
  torch::manual_seed(1);
  torch::Tensor x = torch::randn({32, 4}, dtype);
  return {x, torch::sin(x.sum(1, /*keepdim=*/true))};
}

// Sign of the loss lets a minimizing optimizer reproduce a maximizing one.
template <typename Optimizer>
torch::Tensor train_step(torch::nn::Sequential& model, Optimizer& opt, const Data& data,
                         double sign = 1.0) {
  return opt.step([&] {
    opt.zero_grad();
    torch::Tensor loss = sign * torch::mse_loss(model->forward(data.x), data.y);
    loss.backward();
    return loss;
  });
}

// Distance in units in the last place between same-shaped float32 or float64 tensors.
inline int64_t max_ulp_diff(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type());
  if (a.numel() == 0) return 0;
  // Map the IEEE bit patterns onto integers in the order of the values they encode.
  auto ordered = [](const torch::Tensor& t) {
    torch::Tensor bits;
    int64_t sign_bit;
    if (t.scalar_type() == torch::kFloat) {
      bits = t.contiguous().view(torch::kInt32).to(torch::kInt64);
      sign_bit = std::numeric_limits<int32_t>::min();
    } else {
      TORCH_CHECK(t.scalar_type() == torch::kDouble, "max_ulp_diff: float32 or float64 only");
      bits = t.contiguous().view(torch::kInt64);
      sign_bit = std::numeric_limits<int64_t>::min();
    }
    return torch::where(bits < 0, sign_bit - bits, bits);
  };
  return (ordered(a) - ordered(b)).abs().max().item<int64_t>();
}

// Our kernel adds g*g to the sum with an FMA exactly where torch's vectorized addcmul_ does, so
// sums match bitwise when both run the same kind of kernel. They need not when one is forced
// onto its portable path (FUSED_ADAGRAD_CPU_KERNEL=base without ATEN_CPU_CAPABILITY=default).
inline bool same_fma_as_torch() {
  const bool ours = build_info().cpu_kernel != "base";
  const std::string theirs = at::get_cpu_capability();
  return ours == (theirs != "DEFAULT" && theirs != "NO AVX");
}

inline void expect_sum_matches(const torch::Tensor& ours, const torch::Tensor& reference) {
  if (same_fma_as_torch()) {
    EXPECT_TRUE(torch::equal(ours, reference)) << "max ulp " << max_ulp_diff(ours, reference);
  } else {
    // With weight decay g itself may then differ by an ulp, and g * g by more.
    EXPECT_LE(max_ulp_diff(ours, reference), 4);
  }
}

// |ours - other| <= ulps * ulp(max(|before|, |other - before|)), elementwise: a difference of an
// ulp in the step's size, not in the result's (near zero the two differ by orders of magnitude).
inline void expect_within_step_ulps(const torch::Tensor& ours, const torch::Tensor& other,
                                    const torch::Tensor& before, int ulps) {
  const double unit =
      std::ldexp(1.0, other.scalar_type() == torch::kFloat ? -23 : -52);  // ulp(1)
  const torch::Tensor scale = torch::maximum(before.abs(), (other - before).abs());
  const torch::Tensor excess = (ours - other).abs() - scale * (ulps * unit);
  EXPECT_LE(excess.max().item<double>(), 0.0)
      << "max abs diff " << (ours - other).abs().max().item<double>() << ", max ulp "
      << max_ulp_diff(ours, other);
}

// Correctly rounded (IEEE) sqrt of a float32/float64 tensor. torch.sqrt on CPU goes through MKL's
// vsSqrt, which on some CPUs (the AMD EPYC of our dev machine) is only faithfully rounded; our
// kernel, like torch's fused=True, uses the IEEE sqrt.
inline torch::Tensor ieee_sqrt(const torch::Tensor& t) {
  torch::Tensor out = t.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ieee_sqrt", [&] {
    scalar_t* v = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.numel(); ++i) v[i] = std::sqrt(v[i]);
  });
  return out;
}

// One Adagrad step written with torch's tensor ops in the order of torch.optim.Adagrad's
// single-tensor path (eps_inside_sqrt as Keras/Optax), except for the IEEE sqrt: our kernel must
// match it bitwise. `step` is the value after the increment.
inline void reference_step(torch::Tensor p, const torch::Tensor& grad, torch::Tensor sum,
                           int64_t step, const Hyper& h) {
  torch::NoGradGuard no_grad;
  torch::Tensor g = h.maximize ? -grad : grad;
  if (h.weight_decay != 0) g = g.add(p, h.weight_decay);
  const double clr = h.lr / (1 + static_cast<double>(step - 1) * h.lr_decay);
  sum.addcmul_(g, g, 1.0);
  torch::Tensor denom = h.eps_inside_sqrt ? ieee_sqrt(sum.add(h.eps)) : ieee_sqrt(sum).add_(h.eps);
  p.addcdiv_(g, denom, -clr);
}

// `ours` against reference_step's result: bitwise when both use FMAs alike, else (a forced
// kernel) within 4 ulp of the larger of the old value and the step.
inline void expect_param_matches(const torch::Tensor& ours, const torch::Tensor& reference,
                                 const torch::Tensor& before) {
  if (same_fma_as_torch()) {
    EXPECT_TRUE(torch::equal(ours, reference)) << "max ulp " << max_ulp_diff(ours, reference);
  } else {
    expect_within_step_ulps(ours, reference, before, 4);
  }
}

// Runs `fn` and expects a c10::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected a c10::Error containing \"" << parts.front() << "\"";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const std::string& part : parts) {
      EXPECT_NE(msg.find(part), std::string::npos) << "\"" << part << "\" not in: " << msg;
    }
  }
}

inline std::vector<torch::Tensor> clones(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().clone());
  return out;
}

}  // namespace fused_adagrad::testing
