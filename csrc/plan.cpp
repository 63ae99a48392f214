#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>

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

bool has_grad(GradList grads, size_t i) { return grads[i].has_value() && grads[i]->defined(); }

void check_sum(Variant variant, size_t i, const at::Tensor& p, const at::Tensor& s) {
  TORCH_CHECK(s.defined(), "param ", i, ": state 'sum' is undefined");
  TORCH_CHECK(s.layout() == at::kStrided, "param ", i, ": state 'sum' must be a dense tensor");
  TORCH_CHECK(s.device() == p.device(), "param ", i, ": state 'sum' is on ", s.device(),
              " but the parameter is on ", p.device());
  if (variant == Variant::Elementwise) {
    TORCH_CHECK(s.sizes() == p.sizes(), "param ", i, ": state 'sum' has shape ", s.sizes(),
                " but the parameter has shape ", p.sizes(), " (state loaded from another model?)");
    TORCH_CHECK(s.scalar_type() == p.scalar_type(), "param ", i, ": state 'sum' has dtype ",
                s.scalar_type(), " but the parameter has dtype ", p.scalar_type());
    return;
  }
  const std::vector<int64_t> shape = rowwise_sum_shape(p);
  TORCH_CHECK(s.sizes() == c10::IntArrayRef(shape), "param ", i, ": row-wise state 'sum' has shape ",
              s.sizes(), " but a parameter of shape ", p.sizes(), " needs ", c10::IntArrayRef(shape),
              " (one value per row of dim 0; state loaded from another model or optimizer?)");
  const at::ScalarType dtype = rowwise_sum_dtype(p.scalar_type());
  TORCH_CHECK(s.scalar_type() == dtype, "param ", i, ": row-wise state 'sum' has dtype ",
              s.scalar_type(), " but a ", p.scalar_type(), " parameter needs ", dtype);
}

void check_grad(Variant variant, size_t i, const at::Tensor& p, const at::Tensor& g,
                double weight_decay) {
  TORCH_CHECK(g.layout() == at::kStrided || g.layout() == at::kSparse, "param ", i,
              ": grad layout ", g.layout(), " is not supported (dense or sparse COO)");
  TORCH_CHECK(g.sizes() == p.sizes(), "param ", i, ": grad has shape ", g.sizes(),
              " but the parameter has shape ", p.sizes());
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), "param ", i, ": grad has dtype ",
              g.scalar_type(), " but the parameter has dtype ", p.scalar_type());
  TORCH_CHECK(g.device() == p.device(), "param ", i, ": grad is on ", g.device(),
              " but the parameter is on ", p.device());
  if (g.layout() != at::kSparse) return;
  // torch squares a complex sparse grad as a complex number (g*g, not |g|^2): not Adagrad.
  TORCH_CHECK(!p.is_complex(), "param ", i,
              ": sparse gradients of complex parameters are not supported");
  if (variant == Variant::Elementwise) {
    TORCH_CHECK(weight_decay == 0, "param ", i,
                ": weight_decay option is not compatible with sparse gradients");
  } else {
    TORCH_CHECK(g.sparse_dim() == 1, "param ", i,
                ": row-wise Adagrad takes sparse grads over rows of dim 0 (sparse_dim 1, as "
                "nn.Embedding makes them), got sparse_dim ", g.sparse_dim());
  }
}

// The bytes a tensor's elements can occupy: from its lowest to its highest addressed element.
struct Extent {
  uintptr_t begin, end;
  const at::Tensor* tensor;
  size_t param;
  const char* role;
  bool written;
};

void add_extent(std::vector<Extent>& out, const at::Tensor& t, size_t param, const char* role,
                bool written) {
  // Meta, fake and functional tensors (torch.compile's tracing) have no memory to compare.
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (t.is_meta() || impl->has_symbolic_sizes_strides() || !t.has_storage() ||
      t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python,
                                               c10::DispatchKey::Functionalize})) ||
      t.numel() == 0) {
    return;
  }
  int64_t low = 0, high = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? low : high) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  out.push_back({base + static_cast<uintptr_t>(low * item),
                 base + static_cast<uintptr_t>((high + 1) * item), &t, param, role, written});
}

// How errors name a param given its index in the op's lists: "param 3", or, for an op over
// several param groups (whose ends are given), "param group 1, param 0".
struct ParamNames {
  std::vector<size_t> group_ends;
  std::string operator()(size_t i) const {
    if (group_ends.empty()) return "param " + std::to_string(i);
    const size_t g = std::upper_bound(group_ends.begin(), group_ends.end(), i) - group_ends.begin();
    const size_t begin = g == 0 ? 0 : group_ends[g - 1];
    return "param group " + std::to_string(g) + ", param " + std::to_string(i - begin);
  }
};

// A step writes params, sums and steps: none of them may share memory with another tensor of
// the step (the second write would be lost, or a grad change under the update). Extents are
// sorted, so only neighbours whose ranges meet are compared: O(n log n) for n tensors.
void check_no_aliasing(at::TensorList params, GradList grads, at::TensorList sums,
                       at::TensorList steps, bool grads_written, const ParamNames& name) {
  std::vector<Extent> extents;
  std::vector<at::Tensor> grad_parts;  // owns the tensors the extents of sparse grads point to
  grad_parts.reserve(2 * params.size());
  extents.reserve(4 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    add_extent(extents, params[i], i, "param", true);
    add_extent(extents, sums[i], i, "state 'sum'", true);
    add_extent(extents, steps[i], i, "state 'step'", true);
    if (!has_grad(grads, i)) continue;
    const at::Tensor g = *grads[i];
    if (g.is_sparse()) {
      grad_parts.push_back(g._values());
    } else {
      grad_parts.push_back(g);
    }
    add_extent(extents, grad_parts.back(), i, "grad", grads_written);
  }
  for (const Extent& e : extents) {
    TORCH_CHECK(!e.written || at::has_internal_overlap(*e.tensor) != at::MemOverlap::Yes,
                name(e.param), ": ", e.role,
                " has elements that share memory (e.g. an expanded tensor), so it cannot be "
                "updated in place");
  }
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  for (size_t a = 0; a < extents.size(); ++a) {
    for (size_t b = a + 1; b < extents.size() && extents[b].begin < extents[a].end; ++b) {
      const Extent& x = extents[a];
      const Extent& y = extents[b];
      if (!x.written && !y.written) continue;  // two grads may share memory when only read
      const at::MemOverlapStatus status = at::get_overlap_status(*x.tensor, *y.tensor);
      // TooHard: interleaved strided views whose ranges meet; disjoint in every real case.
      if (status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial) {
        continue;
      }
      TORCH_CHECK(false, name(x.param), ": ", x.role, " shares memory with ", name(y.param),
                  "'s ", y.role, "; a step writes ", x.written ? x.role : y.role,
                  ", so each param, sum and step (and, with a grad_scale, each grad) must be a "
                  "tensor of its own");
    }
  }
}

// The table row of each value row of a sparse COO grad, the param seen as (product of the sparse
// dims) rows, from its indices on the host; throws naming the param and the first bad index.
std::vector<int64_t> rows_from_host_indices(size_t index, const at::Tensor& grad,
                                            const at::Tensor& host_indices) {
  const at::Tensor indices = host_indices.to(at::kLong).contiguous();
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

// Checks the indices of a sparse grad before anything changes. CPU grads: returns each value
// row's table row. Device grads: a min and max per sparse dim on the device and one read of them
// (a synchronization: sparse steps are not capturable anyway, their nnz changes every step); the
// indices come to the host only to name a bad one.
std::vector<int64_t> checked_sparse_rows(size_t index, const at::Tensor& grad) {
  const at::Tensor indices = grad._indices();
  if (grad.is_cpu()) return rows_from_host_indices(index, grad, indices);
  if (grad._nnz() == 0) return {};
  const auto [low, high] = at::aminmax(indices, /*dim=*/1);
  const at::Tensor bounds = at::stack({low, high}).to(at::kCPU, at::kLong);
  const auto b = bounds.accessor<int64_t, 2>();
  for (int64_t d = 0; d < grad.sparse_dim(); ++d) {
    if (b[0][d] < 0 || b[1][d] >= grad.size(d)) {
      rows_from_host_indices(index, grad, indices.cpu());  // throws, naming the first bad index
    }
  }
  return {};
}

CaptureQuery capture_query = nullptr;

// A captured graph replays the kernels with the arguments of the capture: a step counted on the
// host or an lr read from a host tensor would stay at their captured values, and a sparse grad's
// rows (their number included) change every step.
void check_capturable(at::TensorList params, GradList grads, at::TensorList steps,
                      const std::optional<at::Tensor>& lr_tensor, const GradScaling& scaling) {
  if (capture_query == nullptr) return;
  std::vector<at::Device> capturing;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!p.is_cuda() || !has_grad(grads, i)) continue;
    const bool known = std::find(capturing.begin(), capturing.end(), p.device()) != capturing.end();
    if (!known && !capture_query(p.device())) continue;
    if (!known) capturing.push_back(p.device());
    TORCH_CHECK(steps[i].is_cuda(), "param ", i, ": state 'step' is on the CPU while the step is "
                "captured into a CUDA graph, which would replay the count it had at capture; keep "
                "steps on the param's device (as FusedAdagrad and RowWiseAdagrad create them)");
    TORCH_CHECK(!grads[i]->is_sparse(), "param ", i, ": a sparse grad cannot be captured into a "
                "CUDA graph (its rows, and their number, change every step)");
    TORCH_CHECK(!lr_tensor.has_value() || !lr_tensor->defined() || lr_tensor->is_cuda(),
                "lr is a CPU tensor while the step is captured into a CUDA graph, which would keep "
                "the value it had at capture; put the lr tensor on the device");
    for (const auto* t : {&scaling.grad_scale, &scaling.found_inf}) {
      TORCH_CHECK(!t->has_value() || !(*t)->defined() || (*t)->is_cuda(),
                  t == &scaling.grad_scale ? "grad_scale" : "found_inf",
                  " is a CPU tensor while the step is captured into a CUDA graph, which would keep "
                  "the value it had at capture; put it on the device");
    }
  }
}

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return b.strides() == a.strides() && b.is_non_overlapping_and_dense();
}

at::Tensor contiguous_work(const at::Tensor& user, std::vector<Staged>& staged) {
  if (user.is_contiguous()) return user;
  at::Tensor work = user.contiguous();
  staged.push_back({user, work});
  return work;
}

// A grad the kernels read as a copy: kept alive for them, and written back when they unscale it.
void keep_grad_copy(const at::Tensor& user, const at::Tensor& work, StepPlan& plan) {
  if (plan.scaling.unscales()) {
    plan.staged.push_back({user, work});
  } else {
    plan.keep_alive.push_back(work);
  }
}

// Element-wise kernels walk param, grad and sum as flat arrays in memory order: all three dense
// in one layout, or dense copies (empty_like of a dense tensor keeps its strides).
DenseParam elementwise_layout(size_t i, at::Tensor p, at::Tensor g, at::Tensor s,
                              StepPlan& plan) {
  if (p.is_complex()) {
    p = at::view_as_real(p);
    g = at::view_as_real(g);
    s = at::view_as_real(s);
  }
  at::Tensor p_work = p.is_non_overlapping_and_dense() ? p : p.contiguous();
  if (!same_dense_layout(p_work, g)) {
    at::Tensor g_work = at::empty_like(p_work).copy_(g);
    keep_grad_copy(g, g_work, plan);
    g = g_work;
  }
  at::Tensor s_work = same_dense_layout(p_work, s) ? s : at::empty_like(p_work).copy_(s);
  if (!p_work.is_same(p)) plan.staged.push_back({p, p_work});
  if (!s_work.is_same(s)) plan.staged.push_back({s, s_work});
  return {i, p_work, g, s_work, 1};
}

// Row-wise kernels walk rows of dim 0: param and grad contiguous, sum one value per row.
DenseParam rowwise_layout(size_t i, const at::Tensor& p, const at::Tensor& g, const at::Tensor& s,
                          StepPlan& plan) {
  const at::Tensor g_work = g.contiguous();
  if (!g_work.is_same(g)) keep_grad_copy(g, g_work, plan);
  const int64_t rows = p.dim() == 0 ? 1 : p.size(0);
  return {i, contiguous_work(p, plan.staged), g_work, contiguous_work(s, plan.staged),
          p.numel() / rows};
}

}  // namespace

std::vector<int64_t> rowwise_sum_shape(const at::Tensor& param) {
  if (param.dim() == 0) return {};
  return {param.size(0)};
}

at::ScalarType rowwise_sum_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_metadata(Variant variant, at::TensorList params, GradList grads,
                    at::TensorList sums, at::TensorList steps, double weight_decay,
                    const std::optional<at::Tensor>& lr_tensor) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && sums.size() == n && steps.size() == n,
              "fused_adagrad: params, grads, sums and steps must have the same length, got ", n,
              ", ", grads.size(), ", ", sums.size(), " and ", steps.size());
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && at::isFloatingType(lr_tensor->scalar_type()),
                "lr must be a float or a one-element floating tensor, got a ",
                lr_tensor->scalar_type(), " tensor with ", lr_tensor->numel(), " elements");
    const at::Device d = lr_tensor->device();
    TORCH_CHECK(d.is_cpu() || d.is_cuda() || d.is_meta(), "lr is a tensor on ", d,
                "; it must be on the CPU or a CUDA device");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "param ", i, ": undefined tensor");
    TORCH_CHECK(p.layout() == at::kStrided, "param ", i,
                ": the parameter must be a dense tensor, got layout ", p.layout());
    TORCH_CHECK(supported_param_dtype(p.scalar_type()), "param ", i, ": dtype ", p.scalar_type(),
                " is not supported (float32, float64, float16, bfloat16, complex64, complex128)");
    TORCH_CHECK(variant == Variant::Elementwise || !p.is_complex(), "param ", i,
                ": row-wise Adagrad does not support complex parameters (dtype ", p.scalar_type(),
                ")");
    check_sum(variant, i, p, sums[i]);

    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.defined(), "param ", i, ": state 'step' is undefined");
    TORCH_CHECK(st.numel() == 1 && at::isFloatingType(st.scalar_type()) &&
                    st.layout() == at::kStrided,
                "param ", i, ": state 'step' must be a one-element floating tensor, got ",
                st.scalar_type(), " with ", st.numel(), " elements");
    TORCH_CHECK(st.device().is_cpu() || st.device() == p.device(), "param ", i,
                ": state 'step' is on ", st.device(), " but the parameter is on ", p.device());
    // A host step is read for free; a device one would cost a synchronization, so it is not.
    if (st.is_cpu() && !st.is_meta() && st.has_storage() &&
        !st.key_set().has(c10::DispatchKey::Python) &&
        (st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble)) {
      const double v = st.scalar_type() == at::kFloat ? *st.const_data_ptr<float>()
                                                      : *st.const_data_ptr<double>();
      TORCH_CHECK(v >= 0, "param ", i, ": state 'step' is ", v,
                  "; a step count must be a non-negative number (state from a corrupt checkpoint?)");
    }
    if (has_grad(grads, i)) check_grad(variant, i, p, *grads[i], weight_decay);
  }
}

void set_capture_query(CaptureQuery query) { capture_query = query; }

namespace {
CudaLaunchQuery launch_query = nullptr;
}  // namespace

void set_cuda_launch_query(CudaLaunchQuery query) { launch_query = query; }
CudaLaunchInfo cuda_launch_info() { return launch_query != nullptr ? launch_query() : CudaLaunchInfo{}; }

namespace {

// Runs `check` for group `g`; with named groups, its error gains the group's name, so that
// "param 0: ..." says which group's param 0.
template <typename Check>
void in_group(bool name_groups, size_t g, Check&& check) {
  if (!name_groups) return check();
  try {
    check();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "param group ", g, ", ", e.msg());
  }
}

// One group's layout work: dense params by (device, dtype), sparse ones with their checked rows.
StepPlan plan_group(Variant variant, at::TensorList params, GradList grads, at::TensorList sums,
                    const GroupSpan& span, const GradScaling& scaling) {
  // Only the sparse index check can throw; staging copies allocate but change nothing the user
  // holds.
  StepPlan plan;
  plan.begin = span.begin;
  plan.count = span.count;
  plan.options = span.options;
  plan.scaling = scaling;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!has_grad(grads, i)) continue;  // no grad: no step, like torch
    plan.stepping.push_back(i);
    const at::Tensor& p = params[i];
    const at::Tensor& g = *grads[i];
    if (g.is_sparse()) {
      // Checked on an empty table too: any index into a zero-size dimension is out of range.
      std::vector<int64_t> row_of = checked_sparse_rows(i, g);  // throws on a bad index
      if (g._nnz() == 0 || p.numel() == 0) continue;
      int64_t row_count = 1;
      for (int64_t d = 0; d < g.sparse_dim(); ++d) row_count *= g.size(d);
      const at::Tensor values = g._values();
      const at::Tensor values_work = values.contiguous();
      if (!values_work.is_same(values)) keep_grad_copy(values, values_work, plan);
      plan.sparse.push_back({i, contiguous_work(p, plan.staged), contiguous_work(sums[i], plan.staged),
                             g, values_work, std::move(row_of), row_count, p.numel() / row_count});
      continue;
    }
    if (p.numel() == 0) continue;
    DenseParam work = variant == Variant::Elementwise
                          ? elementwise_layout(i, p, g, sums[i], plan)
                          : rowwise_layout(i, p, g, sums[i], plan);
    auto group = std::find_if(plan.dense.begin(), plan.dense.end(), [&](const DenseGroup& d) {
      return d.device == p.device() && d.dtype == p.scalar_type();
    });
    if (group == plan.dense.end()) {
      plan.dense.push_back({p.device(), p.scalar_type(), {}});
      group = plan.dense.end() - 1;
    }
    group->params.push_back(std::move(work));
  }
  return plan;
}

void check_spans(size_t n, const std::vector<GroupSpan>& groups) {
  size_t next = 0;
  for (const GroupSpan& span : groups) {
    TORCH_CHECK(span.begin == next, "fused_adagrad: param groups must cover the lists in order");
    next += span.count;
  }
  TORCH_CHECK(next == n, "fused_adagrad: the group sizes add up to ", next, " but the lists hold ",
              n, " params");
}

}  // namespace

std::vector<GroupSpan> group_spans(const GroupArgs& a) {
  const size_t n = a.sizes.size();
  TORCH_CHECK(a.lr.size() == n && a.lr_decay.size() == n && a.weight_decay.size() == n &&
                  a.eps.size() == n && a.maximize.size() == n && a.eps_inside_sqrt.size() == n &&
                  a.lr_tensor.size() == n,
              "fused_adagrad: group_sizes and every per-group option list must have one entry per "
              "param group (", n, " groups)");
  std::vector<GroupSpan> spans;
  spans.reserve(n);
  size_t begin = 0;
  for (size_t g = 0; g < n; ++g) {
    TORCH_CHECK(a.sizes[g] >= 0, "fused_adagrad: param group ", g, " has a negative size");
    const auto count = static_cast<size_t>(a.sizes[g]);
    std::optional<at::Tensor> lr_tensor = a.lr_tensor[g];
    spans.push_back({begin, count,
                     StepOptions{a.lr[g], a.lr_decay[g], a.weight_decay[g], a.eps[g], a.maximize[g],
                                 a.eps_inside_sqrt[g], std::move(lr_tensor)}});
    begin += count;
  }
  return spans;
}

void check_group_metadata(Variant variant, at::TensorList params, GradList grads,
                          at::TensorList sums, at::TensorList steps,
                          const std::vector<GroupSpan>& groups, bool name_groups) {
  TORCH_CHECK(grads.size() == params.size() && sums.size() == params.size() &&
                  steps.size() == params.size(),
              "fused_adagrad: params, grads, sums and steps must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", sums.size(), " and ", steps.size());
  check_spans(params.size(), groups);
  for (size_t g = 0; g < groups.size(); ++g) {
    const GroupSpan& span = groups[g];
    in_group(name_groups, g, [&] {
      check_metadata(variant, params.slice(span.begin, span.count),
                     grads.slice(span.begin, span.count), sums.slice(span.begin, span.count),
                     steps.slice(span.begin, span.count), span.options.weight_decay,
                     span.options.lr_tensor);
    });
  }
}

std::vector<StepPlan> plan_groups(Variant variant, at::TensorList params, GradList grads,
                                  at::TensorList sums, at::TensorList steps,
                                  const std::vector<GroupSpan>& groups, bool name_groups,
                                  const GradScaling& scaling) {
  check_group_metadata(variant, params, grads, sums, steps, groups, name_groups);
  check_grad_scaling(scaling);
  // Every tensor of the step against every other, across groups too.
  std::vector<size_t> ends;
  for (const GroupSpan& span : groups) ends.push_back(span.begin + span.count);
  check_no_aliasing(params, grads, sums, steps, scaling.unscales(),
                    ParamNames{name_groups ? ends : std::vector<size_t>{}});
  std::vector<StepPlan> plans;
  plans.reserve(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const GroupSpan& span = groups[g];
    const auto slice = [&](auto list) { return list.slice(span.begin, span.count); };
    in_group(name_groups, g, [&] {
      check_capturable(slice(params), slice(grads), slice(steps), span.options.lr_tensor, scaling);
      plans.push_back(plan_group(variant, slice(params), slice(grads), slice(sums), span, scaling));
    });
  }
  return plans;
}

StepPlan plan_step(Variant variant, at::TensorList params, GradList grads, at::TensorList sums,
                   at::TensorList steps, const StepOptions& options) {
  return std::move(
      plan_groups(variant, params, grads, sums, steps, {GroupSpan{0, params.size(), options}}, false)
          .front());
}

namespace {

bool is_embedding_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The bag (of table `table`, counting from its first) that position `pos` of indices lies in.
int64_t bag_at(const std::vector<int64_t>& offsets, int64_t pos) {
  return std::upper_bound(offsets.begin(), offsets.end(), pos) - offsets.begin() - 1;
}

}  // namespace

BagsPlan plan_bags(const BagsArgs& a, bool check_values) {
  const int64_t tables = static_cast<int64_t>(a.weights.size());
  TORCH_CHECK(tables > 0, "embedding bags: no tables");
  TORCH_CHECK(static_cast<int64_t>(a.padding_idx.size()) == tables, "embedding bags: ", tables,
              " tables but ", a.padding_idx.size(), " padding_idx values (one per table, -1 for none)");
  TORCH_CHECK(a.mode == 0 || a.mode == 1, "embedding bags: mode ", a.mode,
              " is not supported (0: sum, 1: mean; max has no fused backward)");
  const at::Tensor& w0 = a.weights[0];
  BagsPlan plan;
  for (int64_t t = 0; t < tables; ++t) {
    const at::Tensor& w = a.weights[t];
    TORCH_CHECK(w.defined() && w.layout() == at::kStrided && w.dim() == 2, "embedding bags: table ",
                t, ": the weight must be a dense 2-D tensor (rows, dim)");
    TORCH_CHECK(is_embedding_dtype(w.scalar_type()), "embedding bags: table ", t, ": dtype ",
                w.scalar_type(), " is not supported (float32, float64, float16, bfloat16)");
    TORCH_CHECK(w.scalar_type() == w0.scalar_type() && w.device() == w0.device(),
                "embedding bags: table ", t, " is ", w.scalar_type(), " on ", w.device(),
                " but table 0 is ", w0.scalar_type(), " on ", w0.device(), "; all tables share one");
    TORCH_CHECK(w.is_contiguous(), "embedding bags: table ", t, ": the weight must be contiguous");
    const int64_t pad = a.padding_idx[t];
    TORCH_CHECK(pad >= -1 && pad < w.size(0), "embedding bags: table ", t, ": padding_idx ", pad,
                " is out of range for a table of ", w.size(0), " rows");
    plan.tables.push_back(BagTable{{}, {}, {}, pad, plan.width});
    plan.width += w.size(1);
  }
  for (const at::Tensor* t : {&a.indices, &a.offsets}) {
    const char* name = t == &a.indices ? "indices" : "offsets";
    TORCH_CHECK(t->defined() && t->layout() == at::kStrided && t->dim() == 1 &&
                    (t->scalar_type() == at::kLong || t->scalar_type() == at::kInt),
                "embedding bags: ", name, " must be a 1-D int64 or int32 tensor");
    TORCH_CHECK(t->device() == w0.device(), "embedding bags: ", name, " are on ", t->device(),
                " but the tables are on ", w0.device());
  }
  const int64_t n = a.indices.numel();
  const at::Tensor* psw = a.per_sample_weights.has_value() && a.per_sample_weights->defined()
                              ? &*a.per_sample_weights
                              : nullptr;
  if (psw != nullptr) {
    TORCH_CHECK(a.mode == 0, "embedding bags: per_sample_weights are only supported with mode sum");
    TORCH_CHECK(psw->layout() == at::kStrided && psw->dim() == 1 && psw->numel() == n,
                "embedding bags: per_sample_weights must be 1-D with one weight per index (", n,
                "), got shape ", psw->sizes());
    TORCH_CHECK(psw->scalar_type() == w0.scalar_type() && psw->device() == w0.device(),
                "embedding bags: per_sample_weights are ", psw->scalar_type(), " on ", psw->device(),
                " but the tables are ", w0.scalar_type(), " on ", w0.device());
  }
  plan.batch = bags_output_shape(a.weights, a.offsets, a.include_last_offset)[0].expect_int();
  const int64_t starts = plan.batch * tables;
  if (!check_values) return plan;

  const at::Tensor offsets = a.offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(starts > 0 || n == 0, "embedding bags: ", n, " indices but no bags");
  for (int64_t k = 0; k < a.offsets.numel(); ++k) {
    TORCH_CHECK(k > 0 || off[0] == 0, "embedding bags: offsets[0] is ", off[0], "; it must be 0");
    TORCH_CHECK(k == 0 || off[k] >= off[k - 1], "embedding bags: offsets[", k, "] = ", off[k],
                " is smaller than offsets[", k - 1, "] = ", off[k - 1]);
    TORCH_CHECK(off[k] <= n, "embedding bags: offsets[", k, "] = ", off[k], " is past the ", n,
                " indices");
  }
  TORCH_CHECK(!a.include_last_offset || off[starts] == n, "embedding bags: the last offset is ",
              off[starts], " but there are ", n, " indices (include_last_offset: it ends the last bag)");
  const at::Tensor indices = a.indices.to(at::kLong).contiguous();
  const at::Tensor host = indices.to(at::kCPU);
  const int64_t* ids = host.const_data_ptr<int64_t>();
  const int64_t batch = plan.batch;
  for (int64_t t = 0; t < tables; ++t) {
    BagTable& table = plan.tables[t];
    const int64_t begin = batch == 0 ? 0 : off[t * batch];
    const int64_t end = t + 1 < tables || a.include_last_offset ? (batch == 0 ? 0 : off[(t + 1) * batch]) : n;
    table.offsets.assign(off + t * batch, off + (t + 1) * batch);
    table.offsets.push_back(end);
    for (int64_t& o : table.offsets) o -= begin;
    const int64_t rows = a.weights[t].size(0);
    for (int64_t pos = begin; pos < end; ++pos) {
      TORCH_CHECK(ids[pos] >= 0 && ids[pos] < rows, "embedding bags: table ", t, ", bag ",
                  bag_at(table.offsets, pos - begin), ": id ", ids[pos], " (position ", pos,
                  " of indices) is out of range for a table of ", rows, " rows");
    }
    table.indices = indices.narrow(0, begin, end - begin);
    if (psw != nullptr) table.per_sample_weights = psw->narrow(0, begin, end - begin).contiguous();
  }
  return plan;
}

std::vector<c10::SymInt> bags_output_shape(at::TensorList weights, const at::Tensor& offsets,
                                           bool include_last_offset) {
  TORCH_CHECK(!weights.empty(), "embedding bags: no tables");
  const int64_t tables = static_cast<int64_t>(weights.size());
  const c10::SymInt starts = offsets.sym_numel() - (include_last_offset ? 1 : 0);
  TORCH_CHECK(starts >= 0 && starts % tables == 0, "embedding bags: ", offsets.sym_numel(),
              " offsets for ", tables, " tables: expected tables * batch",
              include_last_offset ? " + 1 (include_last_offset)" : "");
  c10::SymInt width = 0;
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.dim() == 2, "embedding bags: every weight must be 2-D (rows, dim)");
    width = width + w.sym_size(1);
  }
  return {starts / tables, width};
}

void check_bags_step(Variant variant, const BagsArgs& a, const BagsPlan& plan,
                     at::TensorList sums, at::TensorList steps, const at::Tensor& grad_output,
                     const StepOptions& options) {
  TORCH_CHECK(variant == Variant::RowWise || options.weight_decay == 0,
              "embedding bags: weight_decay is not supported by element-wise Adagrad, whose "
              "grads here are sparse (torch.optim.Adagrad refuses it for sparse grads too); "
              "use the row-wise optimizer, which applies it to the rows a batch touches");
  const std::vector<std::optional<at::Tensor>> no_grads(a.weights.size());
  try {
    plan_step(variant, a.weights, no_grads, sums, steps, options);  // checks state, lr, aliasing
  } catch (const c10::Error& e) {
    std::string message = e.msg();
    if (message.rfind("param ", 0) == 0) message.replace(0, 5, "table");
    TORCH_CHECK(false, "embedding bags: ", message);
  }
  for (size_t t = 0; t < sums.size(); ++t) {
    TORCH_CHECK(sums[t].is_contiguous(), "embedding bags: table ", t, ": state 'sum' must be contiguous");
  }
  const at::Tensor& w0 = a.weights[0];
  TORCH_CHECK(grad_output.defined() && grad_output.layout() == at::kStrided &&
                  grad_output.dim() == 2 && grad_output.size(0) == plan.batch &&
                  grad_output.size(1) == plan.width,
              "embedding bags: the output grad must have shape (", plan.batch, ", ", plan.width,
              "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == w0.scalar_type() && grad_output.device() == w0.device(),
              "embedding bags: the output grad is ", grad_output.scalar_type(), " on ",
              grad_output.device(), " but the tables are ", w0.scalar_type(), " on ", w0.device());
}

void StepPlan::write_back() const {
  for (const Staged& s : staged) s.user.copy_(s.work);
}

void check_grad_scaling(const GradScaling& scaling) {
  for (const auto* t : {&scaling.grad_scale, &scaling.found_inf}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const char* name = t == &scaling.grad_scale ? "grad_scale" : "found_inf";
    TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat &&
                    (*t)->layout() == at::kStrided,
                name, " must be a one-element float32 tensor (as torch.amp.GradScaler makes it), "
                "got a ", (*t)->scalar_type(), " tensor with ", (*t)->numel(), " elements");
    const at::Device d = (*t)->device();
    TORCH_CHECK(d.is_cpu() || d.is_cuda() || d.is_meta(), name, " is a tensor on ", d,
                "; it must be on the CPU or a CUDA device");
  }
}

bool host_found_inf(const GradScaling& scaling) {
  return scaling.may_skip() && scaling.found_inf->item<float>() != 0.0f;
}

HostLearningRate host_learning_rate(const StepOptions& options) {
  const std::optional<at::Tensor>& t = options.lr_tensor;
  if (!t.has_value() || !t->defined()) return {options.lr, false};
  if (t->scalar_type() == at::kFloat) return {t->item<float>(), true};
  return {t->item<double>(), false};
}

double neg_clr(const HostLearningRate& lr, double step, double lr_decay) {
  const double denom = 1 + (step - 1) * lr_decay;
  // torch computes `lr_tensor / denom` as a tensor op: the Python float is cast to the tensor's
  // dtype first, and the quotient is rounded to it.
  if (lr.is_float_tensor) {
    return -static_cast<double>(static_cast<float>(lr.value) / static_cast<float>(denom));
  }
  return -(lr.value / denom);
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

}  // namespace fused_adagrad
