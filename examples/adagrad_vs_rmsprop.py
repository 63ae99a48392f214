"""Adagrad against RMSprop, each at one learning rate on two problems: FusedAdagrad and
torch.optim.RMSprop (alpha 0.9). Adagrad divides the learning rate by the square root of the sum of
all squared gradients so far, which only grows, so its effective step lr / sqrt(sum) shrinks for
ever (like 1/sqrt(t) when the gradient's size stays the same); RMSprop divides by a moving average
of the squared gradients, which forgets, so its step does not shrink.
1. d2l section 7.5's f(x) = 0.1 x1^2 + 2 x2^2 from (-5, -2), lr 0.4, 20 steps: Adagrad's steps
   shrink before x1 gets to the minimum; RMSprop gets there.
2. A noisy linear regression (fresh mini-batches, noisy targets), lr 0.1, 500 steps: RMSprop's
   constant step keeps it jittering above the best loss; Adagrad's shrinking step settles closer.
Prints each optimizer's result and effective step (mean over elements), and writes a PNG of loss
and effective step per step (--out; needs matplotlib)."""
import argparse
import pathlib

import torch

from fused_adagrad import FusedAdagrad

import plotting

NAMES = ("FusedAdagrad", "RMSprop")
# Regression: targets = features @ true_weights + noise; each step draws a fresh mini-batch.
FEATURES, EXAMPLES, BATCH, STEPS, NOISE_STD = 10, 4096, 32, 500, 0.5
DEFAULT_OUT = plotting.BUILD / "adagrad_vs_rmsprop.png"


def make_optimizer(name, params, lr, adagrad_options):
    if name == "FusedAdagrad":
        return FusedAdagrad(params, lr=lr, **adagrad_options)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9)


def effective_step(opt, param):
    """lr / sqrt(accumulator), the mean over the param's elements: how far a unit grad moves it."""
    state = opt.state[param]
    accumulator = state["sum"] if "sum" in state else state["square_avg"]
    return (opt.param_groups[0]["lr"] / accumulator.sqrt()).mean().item()


def run(name, param, loss_fn, lr, steps, adagrad_options=None):
    """Trains param in place; returns the loss after each step and the effective step size."""
    opt = make_optimizer(name, [param], lr, adagrad_options or {})
    losses, step_sizes = [], []
    for step in range(steps):
        opt.zero_grad()
        loss_fn(param, step).backward()
        opt.step()
        with torch.no_grad():
            losses.append(loss_fn(param, None).item())
        step_sizes.append(effective_step(opt, param))
    return losses, step_sizes


def f_2d(x, _step=None):
    return 0.1 * x[0] ** 2 + 2 * x[1] ** 2


def regression_problem():
    """A loss of one mini-batch per step (step None: the whole data set), and its least-squares
    loss, the best any weights reach."""
    gen = torch.Generator().manual_seed(0)
    true_weights = torch.randn(FEATURES, 1, generator=gen)
    features = torch.randn(EXAMPLES, FEATURES, generator=gen)
    targets = features @ true_weights + NOISE_STD * torch.randn(EXAMPLES, 1, generator=gen)
    batches = [torch.randint(0, EXAMPLES, (BATCH,), generator=gen) for _ in range(STEPS)]

    def loss_fn(weights, step):
        rows = slice(None) if step is None else batches[step]
        return torch.nn.functional.mse_loss(features[rows] @ weights, targets[rows])

    best = torch.linalg.lstsq(features, targets).solution
    return loss_fn, loss_fn(best, None).item()


def plot(path, results, best_loss):
    plt = plotting.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (problem, by_name), (loss_ax, step_ax) in zip(results.items(), axes):
        for name, (losses, step_sizes) in by_name.items():
            steps = range(1, len(losses) + 1)
            # The regression's loss above its least-squares best, so it can near 0 on a log axis.
            loss_ax.plot(steps, [loss - best_loss[problem] for loss in losses], label=name)
            step_ax.plot(steps, step_sizes, label=name)
        what = "f(x) after each step" if best_loss[problem] == 0 else "loss above least squares"
        loss_ax.set(title=f"{problem}: {what}", xlabel="step", yscale="log")
        step_ax.set(title=f"{problem}: effective step lr / sqrt(accumulator)", xlabel="step",
                    yscale="log")
        loss_ax.legend()
        step_ax.legend()
    plotting.save(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args()
    results, best_loss = {}, {}

    problem = "f(x) = 0.1 x1^2 + 2 x2^2"
    print(f"{problem} from (-5, -2), lr 0.4, 20 steps:")
    results[problem], best_loss[problem] = {}, 0.0
    for name in NAMES:
        x = torch.tensor([-5.0, -2.0], dtype=torch.float64, requires_grad=True)
        # Adagrad as d2l has it (see d2l_adagrad.py), so x is d2l's.
        results[problem][name] = run(name, x, f_2d, lr=0.4, steps=20,
                                     adagrad_options=dict(eps=1e-6, eps_inside_sqrt=True))
        losses, step_sizes = results[problem][name]
        print(f"  {name:12s} x ({x[0].item():f}, {x[1].item():f}), f {losses[-1]:.6f}, "
              f"effective step {step_sizes[0]:.4f} at step 1, {step_sizes[-1]:.4f} at step 20")

    problem = "noisy regression"
    loss_fn, best = regression_problem()
    print(f"{problem} ({FEATURES} features, noise std {NOISE_STD}, batch {BATCH}), lr 0.1, "
          f"{STEPS} steps; least-squares loss {best:.4f}:")
    results[problem], best_loss[problem] = {}, best
    for name in NAMES:
        weights = torch.zeros(FEATURES, 1, requires_grad=True)
        results[problem][name] = run(name, weights, loss_fn, lr=0.1, steps=STEPS)
        losses, step_sizes = results[problem][name]
        print(f"  {name:12s} loss {losses[-1]:.4f} ({losses[-1] - best:.4f} above least squares), "
              f"effective step {step_sizes[0]:.4f} at step 1, {step_sizes[-1]:.4f} at step {STEPS}")

    adagrad_step = results[problem]["FusedAdagrad"][1][-1]
    rmsprop_step = results[problem]["RMSprop"][1][-1]
    print(f"final effective step: FusedAdagrad {adagrad_step:.4f}, RMSprop {rmsprop_step:.4f} "
          f"({rmsprop_step / adagrad_step:.0f}x larger)")
    plot(args.out, results, best_loss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
