#include "step_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fused_adagrad {

namespace {

bool supported_param_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16:
    case at::kComplexFloat: case at::kComplexDouble:
      return true;
    default:
      return false;
  }
}

}  // namespace

void check_inputs(at::TensorList params, const OptionalTensorList& grads, at::TensorList sums,
                  at::TensorList steps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && sums.size() == n && steps.size() == n,
              "fused_adagrad: params, grads, sums and steps must have the same length, got ", n,
              ", ", grads.size(), ", ", sums.size(), " and ", steps.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "param ", i, ": undefined tensor");
    TORCH_CHECK(p.layout() == at::kStrided, "param ", i, ": the parameter must be a dense tensor, got layout ",
                p.layout());
    TORCH_CHECK(supported_param_dtype(p.scalar_type()), "param ", i, ": dtype ", p.scalar_type(),
                " is not supported (float32, float64, float16, bfloat16, complex64, complex128)");

    const at::Tensor& s = sums[i];
    TORCH_CHECK(s.defined(), "param ", i, ": state 'sum' is undefined");
    TORCH_CHECK(s.layout() == at::kStrided, "param ", i, ": state 'sum' must be a dense tensor");
    TORCH_CHECK(s.sizes() == p.sizes(), "param ", i, ": state 'sum' has shape ", s.sizes(),
                " but the parameter has shape ", p.sizes(), " (state loaded from another model?)");
    TORCH_CHECK(s.scalar_type() == p.scalar_type(), "param ", i, ": state 'sum' has dtype ",
                s.scalar_type(), " but the parameter has dtype ", p.scalar_type());
    TORCH_CHECK(s.device() == p.device(), "param ", i, ": state 'sum' is on ", s.device(),
                " but the parameter is on ", p.device());

    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.defined(), "param ", i, ": state 'step' is undefined");
    TORCH_CHECK(st.numel() == 1 && at::isFloatingType(st.scalar_type()) &&
                    st.layout() == at::kStrided,
                "param ", i, ": state 'step' must be a one-element floating tensor, got ",
                st.scalar_type(), " with ", st.numel(), " elements");
    TORCH_CHECK(st.device().is_cpu() || st.device() == p.device(), "param ", i,
                ": state 'step' is on ", st.device(), " but the parameter is on ", p.device());

    const std::optional<at::Tensor> g_opt = grads[i];
    if (!g_opt.has_value() || !g_opt->defined()) continue;
    const at::Tensor& g = *g_opt;
    TORCH_CHECK(g.layout() == at::kStrided || g.layout() == at::kSparse, "param ", i,
                ": grad layout ", g.layout(), " is not supported (dense or sparse COO)");
    TORCH_CHECK(g.sizes() == p.sizes(), "param ", i, ": grad has shape ", g.sizes(),
                " but the parameter has shape ", p.sizes());
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "param ", i, ": grad has dtype ",
                g.scalar_type(), " but the parameter has dtype ", p.scalar_type());
    TORCH_CHECK(g.device() == p.device(), "param ", i, ": grad is on ", g.device(),
                " but the parameter is on ", p.device());
    TORCH_CHECK(!(g.layout() == at::kSparse && weight_decay != 0), "param ", i,
                ": weight_decay option is not compatible with sparse gradients");
    // torch squares a complex sparse grad as a complex number (g*g, not |g|^2): not Adagrad.
    TORCH_CHECK(!(g.layout() == at::kSparse && p.is_complex()), "param ", i,
                ": sparse gradients of complex parameters are not supported");
  }
}

std::vector<int64_t> sparse_grad_rows(size_t index, const at::Tensor& grad) {
  const at::Tensor indices = grad._indices().to(at::kLong).contiguous();
  const int64_t dims = grad.sparse_dim();
  const int64_t nnz = grad._nnz();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  std::vector<int64_t> rows(nnz, 0);
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t size = grad.size(d);
    const int64_t* row = idx + d * nnz;
    for (int64_t k = 0; k < nnz; ++k) {
      TORCH_CHECK(row[k] >= 0 && row[k] < size, "param ", index, ": sparse grad index ", row[k],
                  " (entry ", k, ") is out of range for dimension ", d, " of size ", size);
      rows[k] = rows[k] * size + row[k];
    }
  }
  return rows;
}

double neg_clr(double lr, const std::optional<at::Tensor>& lr_tensor, double step, double lr_decay) {
  const double denom = 1 + (step - 1) * lr_decay;
  if (!lr_tensor.has_value()) return -(lr / denom);
  // torch computes `lr_tensor / denom` as a tensor op: the Python float is cast to the tensor's
  // dtype first, and the quotient is rounded to it.
  if (lr_tensor->scalar_type() == at::kFloat) {
    const float lr_f = lr_tensor->item<float>();
    return -static_cast<double>(lr_f / static_cast<float>(denom));
  }
  return -(lr_tensor->item<double>() / denom);
}

double increment_host_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kFloat) {
    float* v = step.data_ptr<float>();
    *v += 1.0f;
    return *v;
  }
  if (step.scalar_type() == at::kDouble) {
    double* v = step.data_ptr<double>();
    *v += 1.0;
    return *v;
  }
  step.add_(1);
  return step.item<double>();
}

void sparse_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& sum,
                   double neg_clr, double eps, bool maximize, bool eps_inside_sqrt) {
  // The update is non-linear in the gradient, so duplicate indices must be summed first.
  at::Tensor g = (maximize ? grad.neg() : grad).coalesce();
  const at::Tensor indices = g._indices();
  const at::Tensor values = g._values();
  auto make_sparse = [&](const at::Tensor& v) {
    return at::sparse_coo_tensor(indices, v, g.sizes());
  };
  sum.add_(make_sparse(values.pow(2)));
  at::Tensor std_values = sum.sparse_mask(g)._values();
  std_values = eps_inside_sqrt ? std_values.add_(eps).sqrt_() : std_values.sqrt_().add_(eps);
  param.add_(make_sparse(values / std_values), neg_clr);
}

}  // namespace fused_adagrad
