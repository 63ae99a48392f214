// Interface between the CPU backend (csrc/cpu/adagrad_cpu.cpp) and the SIMD builds of the
// kernels: element-wise and row-wise Adagrad, each for dense and for sparse grads.
#pragma once

#include <cstdint>

namespace fused_adagrad::cpu {

// Complex params arrive as real views; they keep their own entries because torch adds their
// weight decay in complex arithmetic (rounded product, then sum) rather than with an FMA.
enum class Dtype : uint8_t { Float, Double, Half, BFloat16, ComplexFloat, ComplexDouble };
constexpr int kNumDtypes = 6;

// One parameter's contiguous run of elements (complex params arrive as real views).
struct Slice {
  void* param;
  const void* grad;
  void* sum;
  double neg_clr;  // -lr / (1 + (step - 1) * lr_decay), already rounded as PyTorch rounds it
};

// All dense params of one (dtype) group. The elements of all slices form one index space,
// [0, ends[count - 1]), which the caller splits evenly over threads.
struct Update {
  const Slice* slices;
  const int64_t* ends;  // ends[k]: cumulative element count up to and including slice k
  int64_t count;
  Dtype dtype;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
};

using UpdateRangeFn = void (*)(const Update& update, int64_t begin, int64_t end);

// One table's sparse update: a param seen as a table of rows of `row_len` elements, and grad
// rows ("entries") that each add to one table row. `order` lists the entries sorted by table row
// (ties in entry order), and order[segments[k]] .. order[segments[k + 1] - 1] are the entries of
// the k-th distinct table row, `rows[k]`; a row's entries are summed in that order first (in the
// param's dtype element-wise, as torch's coalesce sums; in the math type row-wise).
// Entry e's grad row starts at element (value_row ? value_row[e] : e) * value_stride of `values`
// and, with an `entry_scale` (of the param's dtype), is first multiplied by entry_scale[e] and
// rounded to the dtype: a sparse COO grad's value rows are the entries themselves; an embedding
// bag's entries are its looked-up ids, each reading its bag's output grad row, scaled by its
// per_sample_weight or 1 / bag size. `scratch` holds a row of the summing type, the caller's own
// for this call (the kernels allocate nothing). Row-wise: `sum` holds one value per table row (of the math
// type: float, or double for double) and weight decay applies to the touched rows.
struct SparseUpdate {
  void* param;
  void* sum;
  const void* values;
  const int64_t* value_row;
  int64_t value_stride;
  const void* entry_scale;
  void* scratch;
  const int64_t* order;
  const int64_t* segments;
  const int64_t* rows;
  int64_t row_len;
  Dtype dtype;
  double neg_clr;
  double weight_decay;  // row-wise only (element-wise Adagrad refuses it with sparse grads)
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
};

using SparseRangeFn = void (*)(const SparseUpdate& update, int64_t begin, int64_t end);

// Row-wise Adagrad, dense grads: one param's rows of `row_len` contiguous elements, and its sum,
// one value of the math type per row.
struct RowSlice {
  void* param;
  const void* grad;
  void* sum;
  int64_t row_len;
  double neg_clr;
};

// All row-wise dense params of one dtype. As for Update, their elements form one index space;
// a range of it updates the rows whose first element lies in the range.
struct RowUpdate {
  const RowSlice* slices;
  const int64_t* ends;  // cumulative element counts
  int64_t count;
  Dtype dtype;
  double weight_decay;
  double eps;
  bool maximize;
  bool eps_inside_sqrt;
};

using RowRangeFn = void (*)(const RowUpdate& update, int64_t begin, int64_t end);

// torch.amp.GradScaler's unscaling: grad[i] = grad[i] / scale for n elements of `dtype` (complex:
// its real view), in place, rounded to the dtype, as torch's fused Adagrad divides. The backend
// unscales a few thousand elements at a time and then updates them, so they are still in cache.
using UnscaleFn = void (*)(Dtype dtype, void* grad, int64_t n, float scale);

// The same source (kernel_impl.h) compiled three times with different target flags.
namespace base {
void update_range(const Update&, int64_t, int64_t);
void unscale(Dtype, void*, int64_t, float);
void sparse_update_range(const SparseUpdate&, int64_t, int64_t);
void rowwise_update_range(const RowUpdate&, int64_t, int64_t);
void rowwise_sparse_update_range(const SparseUpdate&, int64_t, int64_t);
}  // namespace base
namespace avx2 {
void update_range(const Update&, int64_t, int64_t);
void unscale(Dtype, void*, int64_t, float);
void sparse_update_range(const SparseUpdate&, int64_t, int64_t);
void rowwise_update_range(const RowUpdate&, int64_t, int64_t);
void rowwise_sparse_update_range(const SparseUpdate&, int64_t, int64_t);
}  // namespace avx2
namespace avx512 {
void update_range(const Update&, int64_t, int64_t);
void unscale(Dtype, void*, int64_t, float);
void sparse_update_range(const SparseUpdate&, int64_t, int64_t);
void rowwise_update_range(const RowUpdate&, int64_t, int64_t);
void rowwise_sparse_update_range(const SparseUpdate&, int64_t, int64_t);
}  // namespace avx512

}  // namespace fused_adagrad::cpu
