// fused_adagrad._C: the C++ optimizer classes and build information for Python. Loading this
// module also registers the ops (torch.ops.fused_adagrad.*), which is how the Python optimizer
// reaches the kernels.
#include "fused_adagrad/fused_adagrad.h"

#include <torch/extension.h>

namespace py = pybind11;

namespace {

// FusedAdagrad and RowWiseAdagrad take the same options and keep the same state fields, so both
// get the same Python class shape.
template <typename Optimizer, typename Options, typename State>
void bind_optimizer(py::module_& m, const char* name, const char* doc) {
  py::class_<Optimizer>(m, name, doc)
      .def(py::init([](std::vector<torch::Tensor> params, double lr, double lr_decay,
                       double weight_decay, double initial_accumulator_value, double eps,
                       bool maximize, bool eps_inside_sqrt) {
             auto options = Options(lr)
                                .lr_decay(lr_decay)
                                .weight_decay(weight_decay)
                                .initial_accumulator_value(initial_accumulator_value)
                                .eps(eps)
                                .maximize(maximize)
                                .eps_inside_sqrt(eps_inside_sqrt);
             return std::make_unique<Optimizer>(std::move(params), options);
           }),
           py::arg("params"), py::arg("lr") = 1e-2, py::arg("lr_decay") = 0.0,
           py::arg("weight_decay") = 0.0, py::arg("initial_accumulator_value") = 0.0,
           py::arg("eps") = 1e-10, py::kw_only(), py::arg("maximize") = false,
           py::arg("eps_inside_sqrt") = false)
      .def("step", [](Optimizer& self) { self.step(); }, py::call_guard<py::gil_scoped_release>())
      .def("zero_grad", &Optimizer::zero_grad, py::arg("set_to_none") = true)
      .def("state", [](Optimizer& self, const torch::Tensor& p) {
             auto& states = self.state();
             auto it = states.find(p.unsafeGetTensorImpl());
             if (it == states.end()) throw py::key_error("no state for this tensor");
             const auto& s = static_cast<const State&>(*it->second);
             py::dict d;
             d["step"] = s.step();
             d["sum"] = s.sum();
             return d;
           }, py::arg("param"), "The state of one param: {'step': Tensor, 'sum': Tensor}.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused-adagrad native module: the C++ FusedAdagrad and RowWiseAdagrad optimizers and "
            "build information";

  m.def("build_info", [] {
    const fused_adagrad::BuildInfo info = fused_adagrad::build_info();
    py::dict d;
    d["version"] = info.version;
    d["torch_version"] = info.torch_version;
    d["cpu_kernels"] = info.cpu_kernels;
    d["cpu_kernels_runnable"] = info.cpu_kernels_runnable;
    d["cpu_kernel"] = info.cpu_kernel;
    d["cpu_kernel_error"] = info.cpu_kernel_error;
    d["cuda"] = info.cuda;
    d["cuda_archs"] = info.cuda_archs;
    d["cuda_devices"] = info.cuda_devices;
    const fused_adagrad::CudaLaunchInfo& c = info.cuda_launch;
    py::dict launch;
    launch["chunk_elements"] = c.chunk_elements;
    launch["small_table_tensors"] = c.small_table_tensors;
    launch["small_table_chunks"] = c.small_table_chunks;
    launch["large_table_tensors"] = c.large_table_tensors;
    launch["large_table_chunks"] = c.large_table_chunks;
    launch["large_tables_usable"] = c.large_tables_usable;
    d["cuda_launch"] = launch;
    return d;
  });

  m.def("advise_huge_pages", &fused_adagrad::advise_huge_pages, py::arg("tensor"),
        "Asks Linux for transparent huge pages for the whole 2 MiB pages of a CPU tensor not yet "
        "written; True if the advice was taken (fused_adagrad.h).");

  bind_optimizer<fused_adagrad::FusedAdagrad, fused_adagrad::FusedAdagradOptions,
                 fused_adagrad::FusedAdagradParamState>(
      m, "CppFusedAdagrad",
      "The LibTorch optimizer fused_adagrad::FusedAdagrad, over one group of tensors.");
  bind_optimizer<fused_adagrad::RowWiseAdagrad, fused_adagrad::RowWiseAdagradOptions,
                 fused_adagrad::RowWiseAdagradParamState>(
      m, "CppRowWiseAdagrad",
      "The LibTorch optimizer fused_adagrad::RowWiseAdagrad (one accumulator per row of dim 0), "
      "over one group of tensors.");
}
