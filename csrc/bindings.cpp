// fused_adagrad._C: the C++ optimizer class and build information for Python. Loading this module
// also registers the ops (torch.ops.fused_adagrad.*), which is how the Python optimizer reaches
// the kernels.
#include "fused_adagrad/fused_adagrad.h"

#include <torch/extension.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused-adagrad native module: the C++ FusedAdagrad optimizer and build information";

  m.def("build_info", [] {
    const fused_adagrad::BuildInfo info = fused_adagrad::build_info();
    py::dict d;
    d["version"] = info.version;
    d["torch_version"] = info.torch_version;
    d["cpu_kernels"] = info.cpu_kernels;
    d["cpu_kernel"] = info.cpu_kernel;
    d["cuda"] = info.cuda;
    return d;
  });

  py::class_<fused_adagrad::FusedAdagrad>(m, "CppFusedAdagrad",
                                         "The LibTorch optimizer fused_adagrad::FusedAdagrad, "
                                         "over one group of tensors.")
      .def(py::init([](std::vector<torch::Tensor> params, double lr, double lr_decay,
                       double weight_decay, double initial_accumulator_value, double eps,
                       bool maximize, bool eps_inside_sqrt) {
             auto options = fused_adagrad::FusedAdagradOptions(lr)
                                .lr_decay(lr_decay)
                                .weight_decay(weight_decay)
                                .initial_accumulator_value(initial_accumulator_value)
                                .eps(eps)
                                .maximize(maximize)
                                .eps_inside_sqrt(eps_inside_sqrt);
             return std::make_unique<fused_adagrad::FusedAdagrad>(std::move(params), options);
           }),
           py::arg("params"), py::arg("lr") = 1e-2, py::arg("lr_decay") = 0.0,
           py::arg("weight_decay") = 0.0, py::arg("initial_accumulator_value") = 0.0,
           py::arg("eps") = 1e-10, py::kw_only(), py::arg("maximize") = false,
           py::arg("eps_inside_sqrt") = false)
      .def("step", [](fused_adagrad::FusedAdagrad& self) { self.step(); },
           py::call_guard<py::gil_scoped_release>())
      .def("zero_grad", &fused_adagrad::FusedAdagrad::zero_grad, py::arg("set_to_none") = true)
      .def("state", [](fused_adagrad::FusedAdagrad& self, const torch::Tensor& p) {
             auto& states = self.state();
             auto it = states.find(p.unsafeGetTensorImpl());
             if (it == states.end()) throw py::key_error("no state for this tensor");
             const auto& s = static_cast<const fused_adagrad::FusedAdagradParamState&>(*it->second);
             py::dict d;
             d["step"] = s.step();
             d["sum"] = s.sum();
             return d;
           }, py::arg("param"), "The state of one param: {'step': Tensor, 'sum': Tensor}.");
}
