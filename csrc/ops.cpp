// The op schemas, their meta (shape-only) kernels, and the C++ entry points that call them
// through the dispatcher, so C++ and Python users reach the same CPU or CUDA kernel.
#include "fused_adagrad/fused_adagrad.h"
#include "plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>
#include <torch/version.h>

namespace fused_adagrad {

namespace cpu {
const char* selected_kernel_name();
std::vector<std::string> compiled_kernel_names();
}  // namespace cpu

namespace {

template <Variant kVariant>
void step_meta(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
               at::TensorList steps, double, double, double weight_decay, double, bool, bool,
               const std::optional<at::Tensor>& lr_tensor) {
  check_metadata(kVariant, params, grads, sums, steps, weight_decay, lr_tensor);
}

// Both step ops have this signature.
using StepFn = void(at::TensorList, const OptionalTensorList&, at::TensorList, at::TensorList,
                    double, double, double, double, bool, bool, const std::optional<at::Tensor>&);

template <Variant kVariant>
c10::TypedOperatorHandle<StepFn> step_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kVariant == Variant::Elementwise ? "fused_adagrad::adagrad_step_"
                                                              : "fused_adagrad::rowwise_adagrad_step_",
                             "")
          .typed<StepFn>();
  return op;
}

// The step is not differentiable. Like ATen's in-place ops it refuses, in grad mode, to write a
// tensor that requires grad, and it bumps the version counter of every tensor it writes, so a
// backward through a value saved before the step fails loudly instead of using the new values.
template <Variant kVariant>
void step_autograd(c10::DispatchKeySet keys, at::TensorList params, const OptionalTensorList& grads,
                   at::TensorList sums, at::TensorList steps, double lr, double lr_decay,
                   double weight_decay, double eps, bool maximize, bool eps_inside_sqrt,
                   const std::optional<at::Tensor>& lr_tensor) {
  const std::initializer_list<at::TensorList> written{params, sums, steps};
  if (at::GradMode::is_enabled()) {
    for (at::TensorList list : written) {
      for (const at::Tensor& t : list) {
        TORCH_CHECK(!t.requires_grad(),
                    "fused_adagrad's step ops write tensors that require grad; "
                    "call it under torch.no_grad()");
      }
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    step_op<kVariant>().redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, sums,
                                   steps, lr, lr_decay, weight_decay, eps, maximize,
                                   eps_inside_sqrt, lr_tensor);
  }
  for (at::TensorList list : written) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
}

// Everything the step would refuse, including the indices of CPU sparse grads, so that a bad
// tensor in a later group fails the step before an earlier group changed.
void check_adagrad_inputs_impl(at::TensorList params, const OptionalTensorList& grads,
                               at::TensorList sums, at::TensorList steps, double weight_decay,
                               bool rowwise, const std::optional<at::Tensor>& lr_tensor) {
  validate_step(rowwise ? Variant::RowWise : Variant::Elementwise, params, grads, sums, steps,
                weight_decay, lr_tensor);
}

}  // namespace

TORCH_LIBRARY(fused_adagrad, m) {
  // One Adagrad step for a list of params that share hyperparameters, in place. grads[i] may be
  // None (that param is skipped and its step not incremented) or sparse COO. The op increments
  // steps[i] and then uses it: clr = lr / (1 + (step - 1) * lr_decay), with lr_tensor (a
  // one-element tensor) taking the place of lr when given.
  m.def(
      "adagrad_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] sums, Tensor(c!)[] steps, *, "
      "float lr, float lr_decay, float weight_decay, float eps, bool maximize, "
      "bool eps_inside_sqrt=False, Tensor? lr_tensor=None) -> ()");
  // Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): sums[i] holds one value per row of dim 0
  // of params[i] (shape (rows,), or () for a 0-d param; float32, float64 for float64 params):
  // m += mean(g * g) over the row, p -= clr * g / (sqrt(m) + eps). Weight decay also applies to
  // sparse grads (to the rows they touch).
  m.def(
      "rowwise_adagrad_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] sums, "
      "Tensor(c!)[] steps, *, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize, bool eps_inside_sqrt=False, Tensor? lr_tensor=None) -> ()");
  // The validation a step op starts with, alone: front ends run it on every param group
  // before stepping any, so a bad tensor in the last group leaves the first untouched.
  m.def(
      "check_adagrad_inputs(Tensor[] params, Tensor?[] grads, Tensor[] sums, Tensor[] steps, *, "
      "float weight_decay, bool rowwise=False, Tensor? lr_tensor=None) -> ()");
  m.impl("check_adagrad_inputs", c10::DispatchKey::CompositeImplicitAutograd,
         &check_adagrad_inputs_impl);
}

TORCH_LIBRARY_IMPL(fused_adagrad, Meta, m) {
  m.impl("adagrad_step_", &step_meta<Variant::Elementwise>);
  m.impl("rowwise_adagrad_step_", &step_meta<Variant::RowWise>);
}

TORCH_LIBRARY_IMPL(fused_adagrad, Autograd, m) {
  m.impl("adagrad_step_", &step_autograd<Variant::Elementwise>);
  m.impl("rowwise_adagrad_step_", &step_autograd<Variant::RowWise>);
}

void adagrad_step_(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                   at::TensorList steps, double lr, double lr_decay, double weight_decay, double eps,
                   bool maximize, bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  step_op<Variant::Elementwise>().call(params, grads, sums, steps, lr, lr_decay, weight_decay, eps,
                                       maximize, eps_inside_sqrt, lr_tensor);
}

void rowwise_adagrad_step_(at::TensorList params, const OptionalTensorList& grads,
                           at::TensorList sums, at::TensorList steps, double lr, double lr_decay,
                           double weight_decay, double eps, bool maximize, bool eps_inside_sqrt,
                           const std::optional<at::Tensor>& lr_tensor) {
  step_op<Variant::RowWise>().call(params, grads, sums, steps, lr, lr_decay, weight_decay, eps,
                                   maximize, eps_inside_sqrt, lr_tensor);
}

void adagrad_step_(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                   at::TensorList steps, const FusedAdagradOptions& options,
                   const std::optional<at::Tensor>& lr_tensor) {
  adagrad_step_(params, grads, sums, steps, options.lr(), options.lr_decay(),
                options.weight_decay(), options.eps(), options.maximize(),
                options.eps_inside_sqrt(), lr_tensor);
}

void rowwise_adagrad_step_(at::TensorList params, const OptionalTensorList& grads,
                           at::TensorList sums, at::TensorList steps,
                           const RowWiseAdagradOptions& options,
                           const std::optional<at::Tensor>& lr_tensor) {
  rowwise_adagrad_step_(params, grads, sums, steps, options.lr(), options.lr_decay(),
                        options.weight_decay(), options.eps(), options.maximize(),
                        options.eps_inside_sqrt(), lr_tensor);
}

void check_adagrad_inputs(at::TensorList params, const OptionalTensorList& grads,
                          at::TensorList sums, at::TensorList steps, double weight_decay,
                          bool rowwise, const std::optional<at::Tensor>& lr_tensor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_adagrad::check_adagrad_inputs", "")
                       .typed<void(at::TensorList, const OptionalTensorList&, at::TensorList,
                                   at::TensorList, double, bool, const std::optional<at::Tensor>&)>();
  op.call(params, grads, sums, steps, weight_decay, rowwise, lr_tensor);
}

BuildInfo build_info() {
#if defined(FUSED_ADAGRAD_WITH_CUDA)
  constexpr bool with_cuda = true;
#else
  constexpr bool with_cuda = false;
#endif
  return {FUSED_ADAGRAD_VERSION, TORCH_VERSION, cpu::compiled_kernel_names(),
          cpu::selected_kernel_name(), with_cuda, cuda_launch_info()};
}

namespace detail {
int link_anchor() { return 0; }
}  // namespace detail

}  // namespace fused_adagrad
