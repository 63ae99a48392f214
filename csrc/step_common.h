// What the backends of the fused_adagrad::adagrad_step_ op share: input validation (sparse
// indices included), the per-parameter learning rate, and the unfused sparse-gradient update the
// CUDA backend still uses (the CPU one has its own fused sparse kernel).
#pragma once

#include "fused_adagrad/fused_adagrad.h"

namespace fused_adagrad {

// Throws (TORCH_CHECK, RuntimeError in Python) naming the parameter index and the problem.
// Checks only metadata, so it also runs on meta/fake tensors.
void check_inputs(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                  at::TensorList steps, double weight_decay);

// -clr for one parameter, rounded exactly as torch.optim.Adagrad's single-tensor path rounds it:
// in double for a float lr; in the lr tensor's dtype for a tensor lr (torch divides the tensor).
double neg_clr(double lr, const std::optional<at::Tensor>& lr_tensor, double step, double lr_decay);

// step += 1 on a one-element host tensor; returns the new value as torch reads it (step.item()).
double increment_host_step(const at::Tensor& step);

// The table row that each value row of a sparse COO grad updates, the param seen as
// (product of the sparse dims) rows: row ids in [0, rows). Reads the indices (CPU tensors), and
// throws naming param `index` and the bad index when one is negative or out of range.
std::vector<int64_t> sparse_grad_rows(size_t index, const at::Tensor& grad);

// torch's sparse path (CUDA backend only): coalesce, sum += g^2 on the rows present, p -= clr * g / std on them.
void sparse_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& sum,
                   double neg_clr, double eps, bool maximize, bool eps_inside_sqrt);

}  // namespace fused_adagrad
