// Calls fused_adagrad::adagrad_step_ by name through the dispatcher: succeeds only if
// libfused_adagrad was loaded and registered its ops.
#if defined(WITH_HEADER)
#include <fused_adagrad/fused_adagrad.h>
#endif
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <optional>

int main() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"fused_adagrad::adagrad_step_", ""});
  if (!handle.has_value()) {
    std::cerr << "fused_adagrad::adagrad_step_ is not registered: libfused_adagrad not loaded\n";
    return 1;
  }
  at::Tensor param = at::ones({4}), sum = at::zeros({4}), step = at::zeros({});
  c10::List<std::optional<at::Tensor>> grads;
  grads.push_back(at::ones({4}));
  handle->typed<void(at::TensorList, const c10::List<std::optional<at::Tensor>>&, at::TensorList,
                     at::TensorList, double, double, double, double, bool, bool,
                     const std::optional<at::Tensor>&)>()
      .call({param}, grads, {sum}, {step}, 0.5, 0, 0, 1e-10, false, false, std::nullopt);
  // One step from sum 0 with grad 1: p = 1 - 0.5 * 1 / (1 + 1e-10).
  const bool ok = step.item<float>() == 1 && std::abs(param[0].item<float>() - 0.5f) < 1e-6f;
  std::cout << (ok ? "op registered and stepped\n" : "op registered but gave a wrong result\n");
  return ok ? 0 : 1;
}
