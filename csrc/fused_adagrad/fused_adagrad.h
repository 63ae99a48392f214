// Public C++ API of fused-adagrad: a drop-in for torch::optim::Adagrad whose step is one fused
// pass over param, grad and the squared-gradient sum, its row-wise variant RowWiseAdagrad, and
// direct access to the ops they run; and embedding tables stepped in their backward
// (embedding_bags.h, FusedEmbeddingBags).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

#define FUSED_ADAGRAD_VERSION "0.1.0"

// Symbols of libfused_adagrad (not TORCH_API: that one imports from libtorch on Windows).
#if defined(FUSED_ADAGRAD_BUILDING_LIBRARY)
#define FUSED_ADAGRAD_API C10_EXPORT
#else
#define FUSED_ADAGRAD_API C10_IMPORT
#endif

namespace fused_adagrad {

// The op's `Tensor?[] grads` argument: one entry per param, nullopt for a param without grad.
using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// Loss scaling for mixed precision, what torch.amp.GradScaler hands torch's fused optimizers
// (both one-element float32 tensors, on the CPU or the params' device; each optional). The step
// divides every grad by grad_scale in its own pass and writes the unscaled grad back (as torch's
// fused=True leaves .grad); a nonzero found_inf makes the step change nothing: no param, sum,
// step count or grad. A CUDA step reads both on the device, without synchronizing.
struct GradScaling {
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  bool unscales() const { return grad_scale.has_value() && grad_scale->defined(); }
  bool may_skip() const { return found_inf.has_value() && found_inf->defined(); }
};

struct FUSED_ADAGRAD_API FusedAdagradOptions
    : public torch::optim::OptimizerCloneableOptions<FusedAdagradOptions> {
  FusedAdagradOptions(double lr = 1e-2);
  TORCH_ARG(double, lr) = 1e-2;
  TORCH_ARG(double, lr_decay) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(double, initial_accumulator_value) = 0;
  TORCH_ARG(double, eps) = 1e-10;
  TORCH_ARG(bool, maximize) = false;
  // p -= clr * g / sqrt(sum + eps) (Keras 3, Optax, d2l) instead of clr * g / (sqrt(sum) + eps).
  TORCH_ARG(bool, eps_inside_sqrt) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  FUSED_ADAGRAD_API friend bool operator==(const FusedAdagradOptions& lhs, const FusedAdagradOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// Same layout as the Python optimizer's state: `step` is a one-element float32 tensor (on the
// param's device for CUDA params), so the step can be captured in a CUDA graph.
struct FUSED_ADAGRAD_API FusedAdagradParamState
    : public torch::optim::OptimizerCloneableParamState<FusedAdagradParamState> {
  TORCH_ARG(torch::Tensor, sum);
  TORCH_ARG(torch::Tensor, step);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  FUSED_ADAGRAD_API friend bool operator==(const FusedAdagradParamState& lhs,
                                   const FusedAdagradParamState& rhs);
};

class FUSED_ADAGRAD_API FusedAdagrad : public torch::optim::Optimizer {
 public:
  explicit FusedAdagrad(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                        FusedAdagradOptions defaults = {});
  explicit FusedAdagrad(std::vector<torch::Tensor> params, FusedAdagradOptions defaults = {})
      : FusedAdagrad({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  // Hides Optimizer::add_param_group (not virtual), which in recent torch (2.13) gives any
  // optimizer other than torch's own the defaults instead of the group's options; call it on a
  // FusedAdagrad.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  // Validates every group before changing anything: a step that throws leaves every parameter
  // and every state tensor as it was.
  torch::Tensor step(LossClosure closure = nullptr) override;

  // A step under loss scaling (GradScaling): grads are unscaled in the same pass, and nothing
  // changes when scaling.found_inf is nonzero. No closure: found_inf is computed from the grads.
  void step(const GradScaling& scaling);

  // Checkpoints (torch::save(opt, ...), torch::load(opt, ...)) interchange with
  // torch::optim::Adagrad's: a job can switch between the two and resume.
  //
  // save writes torch::optim::Adagrad's layout (torch/optim/serialize.h) with its int64 `step`,
  // so torch's Adagrad loads the archive as its own: one format, no option to pick. Our extra
  // options (maximize, eps_inside_sqrt) are written too; torch ignores them, it has neither. A
  // step that an int64 would not restore exactly (not a 0-d float32 integral count on the
  // param's device, as the optimizer creates it; possible only if the user replaced it) is
  // written as its tensor instead, which our load restores and torch's refuses.
  //
  // load reads archives of FusedAdagrad (this layout, and earlier ones with a float32 tensor
  // step) and of torch::optim::Adagrad: an int64 step becomes the float32 0-d tensor the
  // optimizer uses (on the param's device for CUDA params; exact up to 2^24, as far as a float32
  // step counts), and a group without maximize/eps_inside_sqrt (torch's) gets false for both.
  // The archive's options replace each group's, as in torch; a sum, or a step not on the CPU,
  // on a device other than its param's moves there; a param the archive has no state for gets
  // fresh state at its next step. Everything is read and checked against the params (the
  // shape, dtype and device a step requires) before anything changes: an archive that is
  // truncated, corrupt, of another model or of RowWiseAdagrad raises and leaves the optimizer
  // as it was.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  // Creates state for params that have none (e.g. added with add_param_group), using their own
  // group's initial_accumulator_value.
  FusedAdagradParamState& state_for(const torch::Tensor& p, const FusedAdagradOptions& options);
  torch::Tensor step_with(const LossClosure& closure, const GradScaling& scaling);
};

// Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one accumulator per row of dim 0, for
// embedding tables whose element-wise state would double their memory. Same options, defaults
// and meaning as FusedAdagradOptions.
struct FUSED_ADAGRAD_API RowWiseAdagradOptions
    : public torch::optim::OptimizerCloneableOptions<RowWiseAdagradOptions> {
  RowWiseAdagradOptions(double lr = 1e-2);
  TORCH_ARG(double, lr) = 1e-2;
  TORCH_ARG(double, lr_decay) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(double, initial_accumulator_value) = 0;
  TORCH_ARG(double, eps) = 1e-10;
  TORCH_ARG(bool, maximize) = false;
  // p -= clr * g / sqrt(m + eps) instead of clr * g / (sqrt(m) + eps).
  TORCH_ARG(bool, eps_inside_sqrt) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  FUSED_ADAGRAD_API friend bool operator==(const RowWiseAdagradOptions& lhs,
                                           const RowWiseAdagradOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// `sum`: one value per row of dim 0, shape (rows,) (() for a 0-d param), float32 (float64 for
// float64 params). `step`: as in FusedAdagradParamState.
struct FUSED_ADAGRAD_API RowWiseAdagradParamState
    : public torch::optim::OptimizerCloneableParamState<RowWiseAdagradParamState> {
  TORCH_ARG(torch::Tensor, sum);
  TORCH_ARG(torch::Tensor, step);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  FUSED_ADAGRAD_API friend bool operator==(const RowWiseAdagradParamState& lhs,
                                           const RowWiseAdagradParamState& rhs);
};

// The optimizer of rowwise_adagrad_step_: per row r, g = grad (+ weight_decay * p),
// m[r] += mean(g * g over the row), p[r] -= clr * g / (sqrt(m[r]) + eps). Sparse (embedding)
// grads take weight decay on the rows they touch. Float32/64, float16 and bfloat16 params;
// complex params are refused at the step. Otherwise it behaves as FusedAdagrad.
class FUSED_ADAGRAD_API RowWiseAdagrad : public torch::optim::Optimizer {
 public:
  explicit RowWiseAdagrad(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                          RowWiseAdagradOptions defaults = {});
  explicit RowWiseAdagrad(std::vector<torch::Tensor> params, RowWiseAdagradOptions defaults = {})
      : RowWiseAdagrad({torch::optim::OptimizerParamGroup(std::move(params))},
                       std::move(defaults)) {}

  // Hides Optimizer::add_param_group, as FusedAdagrad::add_param_group does.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  // Validates every group before changing anything, as FusedAdagrad::step.
  torch::Tensor step(LossClosure closure = nullptr) override;

  // A step under loss scaling, as FusedAdagrad::step(const GradScaling&).
  void step(const GradScaling& scaling);

  // The same layout as FusedAdagrad's checkpoints, but the step stays a float32 tensor (which
  // torch::optim::Adagrad refuses to load: a row-wise sum is not its state), and the archive
  // names RowWiseAdagrad. load takes only archives so named: one of FusedAdagrad or
  // torch::optim::Adagrad raises, changing nothing, as does a truncated or corrupt one.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  RowWiseAdagradParamState& state_for(const torch::Tensor& p, const RowWiseAdagradOptions& options);
  torch::Tensor step_with(const LossClosure& closure, const GradScaling& scaling);
};

// The ops, called through the dispatcher (CPU, CUDA when built with it, Meta). See csrc/ops.cpp
// for the schemas. `steps` are incremented by the op for every param that has a grad.
//
// With the hyperparameters from an options object, named as in the optimizers:
//   fused_adagrad::adagrad_step_(params, grads, sums, steps,
//                                FusedAdagradOptions(0.05).lr_decay(1e-3).eps_inside_sqrt(true));
// initial_accumulator_value is not the op's (it only sets up a new sum). Same checks and result
// as the raw op below: the range checks (a negative lr, ...) are the optimizers'.
FUSED_ADAGRAD_API void adagrad_step_(at::TensorList params, const OptionalTensorList& grads,
                                     at::TensorList sums, at::TensorList steps,
                                     const FusedAdagradOptions& options,
                                     const std::optional<at::Tensor>& lr_tensor = std::nullopt);
FUSED_ADAGRAD_API void rowwise_adagrad_step_(
    at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
    at::TensorList steps, const RowWiseAdagradOptions& options,
    const std::optional<at::Tensor>& lr_tensor = std::nullopt);

// The raw ops, every hyperparameter by position in the schema's order.
FUSED_ADAGRAD_API void adagrad_step_(at::TensorList params, const OptionalTensorList& grads,
                             at::TensorList sums, at::TensorList steps, double lr, double lr_decay,
                             double weight_decay, double eps, bool maximize, bool eps_inside_sqrt,
                             const std::optional<at::Tensor>& lr_tensor = std::nullopt);
// Row-wise Adagrad: sums[i] has one value per row of dim 0 (see RowWiseAdagrad).
FUSED_ADAGRAD_API void rowwise_adagrad_step_(at::TensorList params, const OptionalTensorList& grads,
                                             at::TensorList sums, at::TensorList steps, double lr,
                                             double lr_decay, double weight_decay, double eps,
                                             bool maximize, bool eps_inside_sqrt,
                                             const std::optional<at::Tensor>& lr_tensor = std::nullopt);
// Several param groups in one call, as the optimizers step: group g is the next group_sizes[g]
// params, with its own entry of each option list (lr_tensor[g] None: lr[g] is used). Every
// tensor of every group is checked, across groups too, before anything changes; errors name the
// group ("param group 1, param 0: ..."). `rowwise`: row-wise Adagrad, as rowwise_adagrad_step_.
// `grad_scale`, `found_inf`: loss scaling, as in GradScaling.
FUSED_ADAGRAD_API void adagrad_step_groups_(
    at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
    at::TensorList steps, c10::IntArrayRef group_sizes, c10::ArrayRef<double> lr,
    c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps,
    const c10::List<bool>& maximize, const c10::List<bool>& eps_inside_sqrt,
    const OptionalTensorList& lr_tensor, bool rowwise,
    const std::optional<at::Tensor>& grad_scale = std::nullopt,
    const std::optional<at::Tensor>& found_inf = std::nullopt);

// How the CUDA backend splits element-wise work into launches (all zero without CUDA), so that
// tests can assert which splits they cover. Each block updates one chunk; a launch's argument
// table holds at most `*_tensors` tensors and `*_chunks` chunks. The 4 KB tables serve graph
// capture and CUDA runtimes older than 12.1, the 32 KB ones every other launch.
struct CudaLaunchInfo {
  int64_t chunk_elements = 0;
  int64_t small_table_tensors = 0, small_table_chunks = 0;
  int64_t large_table_tensors = 0, large_table_chunks = 0;  // 0: not compiled in
  bool large_tables_usable = false;  // compiled in, and this runtime and driver take them
};

// Never throws and never initializes CUDA: it answers on a machine without a GPU or a driver.
struct BuildInfo {
  std::string version;
  std::string torch_version;                // the torch this library was compiled against
  std::vector<std::string> cpu_kernels;     // SIMD paths compiled in
  std::vector<std::string> cpu_kernels_runnable;  // those this CPU runs (FUSED_ADAGRAD_MAX_ISA caps it)
  std::string cpu_kernel;                   // the one steps use; empty when cpu_kernel_error is set
  std::string cpu_kernel_error;             // why FUSED_ADAGRAD_CPU_KERNEL (or _MAX_ISA) cannot be honoured
  bool cuda = false;                        // CUDA kernels compiled in
  std::vector<std::string> cuda_archs;      // what they were built for: {"8.0", "9.0+PTX"}
  int64_t cuda_devices = 0;                 // GPUs usable now (0 without a GPU or driver)
  CudaLaunchInfo cuda_launch;
};
FUSED_ADAGRAD_API BuildInfo build_info();

// Asks Linux for transparent huge pages (madvise MADV_HUGEPAGE) for the whole 2 MiB pages of a
// CPU tensor's memory; true if the advice was taken. Call it on a tensor not yet written (fresh
// from at::empty): the pages are then huge from their first write. The optimizers do it for the
// state they create, FusedEmbeddingBags for its tables: a sparse step touches rows scattered
// over the whole table, and on 4 KiB pages each touched row costs a TLB miss. For params you
// allocate yourself, PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every large tensor.
// FUSED_ADAGRAD_HUGE_PAGES=0 turns it off.
FUSED_ADAGRAD_API bool advise_huge_pages(const at::Tensor& t);

namespace detail {
// Referencing a symbol of the library from every including translation unit keeps linkers that
// drop unused shared libraries (--as-needed) from dropping ours, and with it the op registrations.
FUSED_ADAGRAD_API int link_anchor();
// A call, not `&link_anchor`: compilers emit an unused inline variable only when its
// initialization has to run, so a constant address would leave no reference at all.
inline const int kLinkAnchor = link_anchor();
}  // namespace detail

}  // namespace fused_adagrad

#include "embedding_bags.h"  // NOLINT(build/include): after FUSED_ADAGRAD_API
