// The op schemas, their meta (shape-only) kernels, and the C++ entry points that call them
// through the dispatcher, so C++ and Python users reach the same CPU or CUDA kernel.
#include "fused_adagrad/fused_adagrad.h"
#include "plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/cuda.h>
#include <torch/library.h>
#include <torch/version.h>

namespace fused_adagrad {

namespace cpu {
std::string selected_kernel_name();
std::string kernel_selection_error();
std::vector<std::string> compiled_kernel_names();
std::vector<std::string> runnable_kernel_names();
}  // namespace cpu

namespace {

template <Variant kVariant>
void step_meta(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
               at::TensorList steps, double, double, double weight_decay, double, bool, bool,
               const std::optional<at::Tensor>& lr_tensor) {
  check_metadata(kVariant, params, grads.vec(), sums, steps, weight_decay, lr_tensor);
}

void step_groups_meta(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                      at::TensorList steps, c10::IntArrayRef group_sizes, c10::ArrayRef<double> lr,
                      c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                      c10::ArrayRef<double> eps, const c10::List<bool>& maximize,
                      const c10::List<bool>& eps_inside_sqrt, const OptionalTensorList& lr_tensor,
                      bool rowwise, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  check_group_metadata(
      rowwise ? Variant::RowWise : Variant::Elementwise, params, grads.vec(), sums, steps,
      group_spans({group_sizes, lr, lr_decay, weight_decay, eps, maximize, eps_inside_sqrt, lr_tensor}),
      true);
  check_grad_scaling({grad_scale, found_inf});
}

// The signatures of the step ops (the two per-group ones share one).
using StepFn = void(at::TensorList, const OptionalTensorList&, at::TensorList, at::TensorList,
                    double, double, double, double, bool, bool, const std::optional<at::Tensor>&);
using StepGroupsFn = void(at::TensorList, const OptionalTensorList&, at::TensorList, at::TensorList,
                          c10::IntArrayRef, c10::ArrayRef<double>, c10::ArrayRef<double>,
                          c10::ArrayRef<double>, c10::ArrayRef<double>, const c10::List<bool>&,
                          const c10::List<bool>&, const OptionalTensorList&, bool,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

template <Variant kVariant>
c10::TypedOperatorHandle<StepFn> step_op() {
  static const auto op = typed_op<StepFn>(kVariant == Variant::Elementwise
                                              ? "fused_adagrad::adagrad_step_"
                                              : "fused_adagrad::rowwise_adagrad_step_");
  return op;
}

c10::TypedOperatorHandle<StepGroupsFn> step_groups_op() {
  static const auto op = typed_op<StepGroupsFn>("fused_adagrad::adagrad_step_groups_");
  return op;
}

// The steps are not differentiable. Like ATen's in-place ops they refuse, in grad mode, to write
// a tensor that requires grad, and they bump the version counter of every tensor they write, so a
// backward through a value saved before the step fails loudly instead of using the new values.
// `written_grads`: the grads a grad_scale makes the step write (their values, for sparse ones).
template <typename Redispatch>
void autograd_around(at::TensorList params, at::TensorList sums, at::TensorList steps,
                     const std::vector<at::Tensor>& written_grads, Redispatch&& redispatch) {
  const std::initializer_list<at::TensorList> written{params, sums, steps, written_grads};
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
    redispatch();
  }
  for (at::TensorList list : written) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
}

std::vector<at::Tensor> grads_written(const OptionalTensorList& grads,
                                      const std::optional<at::Tensor>& grad_scale) {
  std::vector<at::Tensor> out;
  if (!grad_scale.has_value() || !grad_scale->defined()) return out;
  for (const std::optional<at::Tensor>& g : grads) {
    if (g.has_value() && g->defined()) out.push_back(*g);
  }
  return out;
}

template <Variant kVariant>
void step_autograd(c10::DispatchKeySet keys, at::TensorList params, const OptionalTensorList& grads,
                   at::TensorList sums, at::TensorList steps, double lr, double lr_decay,
                   double weight_decay, double eps, bool maximize, bool eps_inside_sqrt,
                   const std::optional<at::Tensor>& lr_tensor) {
  autograd_around(params, sums, steps, {}, [&] {
    step_op<kVariant>().redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, sums,
                                   steps, lr, lr_decay, weight_decay, eps, maximize,
                                   eps_inside_sqrt, lr_tensor);
  });
}

void step_groups_autograd(c10::DispatchKeySet keys, at::TensorList params,
                          const OptionalTensorList& grads, at::TensorList sums,
                          at::TensorList steps, c10::IntArrayRef group_sizes,
                          c10::ArrayRef<double> lr, c10::ArrayRef<double> lr_decay,
                          c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps,
                          const c10::List<bool>& maximize, const c10::List<bool>& eps_inside_sqrt,
                          const OptionalTensorList& lr_tensor, bool rowwise,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  autograd_around(params, sums, steps, grads_written(grads, grad_scale), [&] {
    step_groups_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, sums,
                                steps, group_sizes, lr, lr_decay, weight_decay, eps, maximize,
                                eps_inside_sqrt, lr_tensor, rowwise, grad_scale, found_inf);
  });
}

using BagsStepFn = void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        int64_t, c10::IntArrayRef, bool, bool, double, double, double, double, bool,
                        bool, const std::optional<at::Tensor>&);

c10::TypedOperatorHandle<BagsStepFn> bags_step_op() {
  static const auto op = typed_op<BagsStepFn>("fused_adagrad::embedding_bags_adagrad_step_");
  return op;
}

void bags_step_meta(at::TensorList weights, at::TensorList sums, at::TensorList steps,
                    const at::Tensor& grad_output, const at::Tensor& indices,
                    const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
                    int64_t mode, c10::IntArrayRef padding_idx, bool include_last_offset,
                    bool rowwise, double lr, double lr_decay, double weight_decay, double eps,
                    bool maximize, bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  TORCH_CHECK(rowwise || weight_decay == 0,
              "embedding bags: weight_decay is not supported by element-wise Adagrad");
  TORCH_CHECK(weights.size() == sums.size() && weights.size() == steps.size(),
              "embedding bags: ", weights.size(), " tables but ", sums.size(), " sums and ",
              steps.size(), " steps");
  const std::vector<c10::SymInt> shape = bags_output_shape(weights, offsets, include_last_offset);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.sym_size(0) == shape[0] &&
                  grad_output.sym_size(1) == shape[1],
              "embedding bags: the output grad must have shape (", shape[0], ", ", shape[1],
              "), got ", grad_output.sym_sizes());
}

void bags_step_autograd(c10::DispatchKeySet keys, at::TensorList weights, at::TensorList sums,
                        at::TensorList steps, const at::Tensor& grad_output,
                        const at::Tensor& indices, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& per_sample_weights, int64_t mode,
                        c10::IntArrayRef padding_idx, bool include_last_offset, bool rowwise,
                        double lr, double lr_decay, double weight_decay, double eps, bool maximize,
                        bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  autograd_around(weights, sums, steps, {}, [&] {
    bags_step_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, weights, sums, steps,
                              grad_output, indices, offsets, per_sample_weights, mode, padding_idx,
                              include_last_offset, rowwise, lr, lr_decay, weight_decay, eps,
                              maximize, eps_inside_sqrt, lr_tensor);
  });
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
  // Several param groups in one call (what FusedAdagrad and RowWiseAdagrad run): group g is the
  // next group_sizes[g] params, with entry g of each option list. Everything is validated,
  // across groups, before any group changes; errors name the group. grad_scale and found_inf
  // are torch.amp.GradScaler's (fused_adagrad.h, GradScaling): with a grad_scale the step divides
  // each grad by it and writes the unscaled grad back (hence grads are mutable), and a nonzero
  // found_inf makes the step change nothing.
  m.def(
      "adagrad_step_groups_(Tensor(a!)[] params, Tensor(d!)?[] grads, Tensor(b!)[] sums, "
      "Tensor(c!)[] steps, *, int[] group_sizes, float[] lr, float[] lr_decay, "
      "float[] weight_decay, float[] eps, bool[] maximize, bool[] eps_inside_sqrt, "
      "Tensor?[] lr_tensor, bool rowwise=False, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // Embedding bags over several tables (plan.h, BagsArgs: indices and offsets of all tables in
  // nn.EmbeddingBag's convention; pooling 0 sum, 1 mean; padding_idx -1 for none): the pooled rows
  // of every table, side by side, one output row per bag (batch, sum of the tables' dims). Checks
  // every id and offset first, naming the table, bag and position of a bad one.
  m.def(
      "embedding_bags_forward(Tensor[] weights, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, *, int pooling, int[] padding_idx, bool include_last_offset) "
      "-> Tensor");
  // The Adagrad step (row-wise with rowwise=True) that nn.EmbeddingBag(sparse=True)'s sparse
  // grads would get from adagrad_step_ / rowwise_adagrad_step_, from the output grad of the same
  // batch, without making those grads: the same rows, summed in the same order. Every table's
  // step is incremented, touched by the batch or not.
  m.def(
      "embedding_bags_adagrad_step_(Tensor(a!)[] weights, Tensor(b!)[] sums, Tensor(c!)[] steps, "
      "Tensor grad_output, Tensor indices, Tensor offsets, Tensor? per_sample_weights, *, "
      "int pooling, int[] padding_idx, bool include_last_offset, bool rowwise, float lr, "
      "float lr_decay, float weight_decay, float eps, bool maximize, bool eps_inside_sqrt, "
      "Tensor? lr_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_adagrad, Meta, m) {
  m.impl("adagrad_step_", &step_meta<Variant::Elementwise>);
  m.impl("rowwise_adagrad_step_", &step_meta<Variant::RowWise>);
  m.impl("adagrad_step_groups_", &step_groups_meta);
  m.impl("embedding_bags_adagrad_step_", &bags_step_meta);
}

TORCH_LIBRARY_IMPL(fused_adagrad, Autograd, m) {
  m.impl("adagrad_step_", &step_autograd<Variant::Elementwise>);
  m.impl("rowwise_adagrad_step_", &step_autograd<Variant::RowWise>);
  m.impl("adagrad_step_groups_", &step_groups_autograd);
  m.impl("embedding_bags_adagrad_step_", &bags_step_autograd);
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

void adagrad_step_groups_(at::TensorList params, const OptionalTensorList& grads,
                          at::TensorList sums, at::TensorList steps, c10::IntArrayRef group_sizes,
                          c10::ArrayRef<double> lr, c10::ArrayRef<double> lr_decay,
                          c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps,
                          const c10::List<bool>& maximize, const c10::List<bool>& eps_inside_sqrt,
                          const OptionalTensorList& lr_tensor, bool rowwise,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  step_groups_op().call(params, grads, sums, steps, group_sizes, lr, lr_decay, weight_decay, eps,
                        maximize, eps_inside_sqrt, lr_tensor, rowwise, grad_scale, found_inf);
}

void embedding_bags_adagrad_step_(at::TensorList weights, at::TensorList sums,
                                  at::TensorList steps, const at::Tensor& grad_output,
                                  const at::Tensor& indices, const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& per_sample_weights,
                                  int64_t mode, c10::IntArrayRef padding_idx,
                                  bool include_last_offset, bool rowwise, double lr,
                                  double lr_decay, double weight_decay, double eps, bool maximize,
                                  bool eps_inside_sqrt, const std::optional<at::Tensor>& lr_tensor) {
  bags_step_op().call(weights, sums, steps, grad_output, indices, offsets, per_sample_weights,
                      mode, padding_idx, include_last_offset, rowwise, lr, lr_decay, weight_decay,
                      eps, maximize, eps_inside_sqrt, lr_tensor);
}

#if defined(FUSED_ADAGRAD_WITH_CUDA)
// The build defines FUSED_ADAGRAD_CUDA_ARCHS as TORCH_CUDA_ARCH_LIST with commas for separators
// (8.0,9.0+PTX), bare tokens that survive every build tool's quoting; this makes them a string.
#define FUSED_ADAGRAD_STRINGIFY_ARGS(...) #__VA_ARGS__
#define FUSED_ADAGRAD_STRINGIFY(...) FUSED_ADAGRAD_STRINGIFY_ARGS(__VA_ARGS__)

namespace {
std::vector<std::string> split_arch_list(const std::string& list) {
  std::vector<std::string> archs;
  size_t begin = 0;
  while (begin < list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    if (end > begin) archs.push_back(list.substr(begin, end - begin));
    begin = end + 1;
  }
  return archs;
}
}  // namespace
#endif

BuildInfo build_info() {
  BuildInfo info;
  info.version = FUSED_ADAGRAD_VERSION;
  info.torch_version = TORCH_VERSION;
  info.cpu_kernels = cpu::compiled_kernel_names();
  info.cpu_kernels_runnable = cpu::runnable_kernel_names();
  info.cpu_kernel = cpu::selected_kernel_name();
  info.cpu_kernel_error = cpu::kernel_selection_error();
#if defined(FUSED_ADAGRAD_WITH_CUDA)
  info.cuda = true;
  info.cuda_archs = split_arch_list(FUSED_ADAGRAD_STRINGIFY(FUSED_ADAGRAD_CUDA_ARCHS));
  // torch's count asks the driver and answers 0, without raising, where there is none.
  info.cuda_devices = static_cast<int64_t>(torch::cuda::device_count());
#endif
  info.cuda_launch = cuda_launch_info();
  return info;
}

namespace detail {
int link_anchor() { return 0; }
}  // namespace detail

}  // namespace fused_adagrad
