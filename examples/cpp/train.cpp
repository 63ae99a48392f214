// Trains a small regression model with fused_adagrad::FusedAdagrad, the drop-in for
// torch::optim::Adagrad, and prints the loss and what the library was built with.
#include <fused_adagrad/fused_adagrad.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(8, 32), torch::nn::Tanh(),
                              torch::nn::Linear(32, 1));
  const torch::Tensor x = torch::randn({256, 8});
  const torch::Tensor y = x.sum(1, /*keepdim=*/true).sin();

  fused_adagrad::FusedAdagrad optimizer(
      model->parameters(), fused_adagrad::FusedAdagradOptions(0.05).weight_decay(1e-4));
  float first = 0, last = 0;
  for (int step = 1; step <= 200; ++step) {
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    optimizer.step();
    last = loss.item<float>();
    if (step == 1) first = last;
    if (step == 1 || step % 50 == 0) std::cout << "step " << step << "  loss " << last << "\n";
  }

  const fused_adagrad::BuildInfo info = fused_adagrad::build_info();
  std::cout << "fused_adagrad " << info.version << " (torch " << info.torch_version
            << "), CPU kernel " << info.cpu_kernel << ", CUDA " << (info.cuda ? "yes" : "no")
            << "\n";
  return last < first / 2 ? 0 : 1;  // nonzero if it did not train
}
