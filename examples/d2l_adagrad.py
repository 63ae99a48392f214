"""d2l section 7.5 (Dive into Deep Learning), AdaGrad, with FusedAdagrad: minimizes
f(x) = 0.1 x1^2 + 2 x2^2 from x = (-5, -2) for 20 steps with eta 0.4, then with eta 2, prints the
final point next to the one d2l publishes, and writes a PNG of both trajectories over the contours
of f (--out; needs matplotlib). d2l's update is Adagrad with eps 1e-6 inside the square root,
x -= eta * g / sqrt(s + eps), which is FusedAdagrad(eps=1e-6, eps_inside_sqrt=True)."""
import argparse
import pathlib

import torch

from fused_adagrad import FusedAdagrad

import plotting

START = (-5.0, -2.0)
EPOCHS = 20
# d2l's printed result after 20 epochs, per learning rate.
D2L_FINAL = {0.4: (-2.382563, -0.158591), 2.0: (-0.002295, -0.000000)}
DEFAULT_OUT = plotting.BUILD / "d2l_adagrad.png"


def f_2d(x):
    return 0.1 * x[0] ** 2 + 2 * x[1] ** 2


def train(eta):
    """The points x visits, START first: one row per epoch."""
    # float64, as d2l's Python floats: the optimizer steps in the param's dtype.
    x = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    opt = FusedAdagrad([x], lr=eta, eps=1e-6, eps_inside_sqrt=True)
    points = [x.detach().clone()]
    for _ in range(EPOCHS):
        opt.zero_grad()
        f_2d(x).backward()  # g = (0.2 x1, 4 x2), from autograd
        opt.step()
        points.append(x.detach().clone())
    return torch.stack(points)


def plot(path, trajectories):
    plt = plotting.pyplot()
    if plt is None:
        return
    x1, x2 = torch.meshgrid(torch.linspace(-5.5, 1.0, 200), torch.linspace(-3.0, 1.5, 200),
                            indexing="ij")
    fig, axes = plt.subplots(1, len(trajectories), figsize=(12, 4.5))
    for ax, (eta, points) in zip(axes, trajectories.items()):
        ax.contour(x1, x2, f_2d((x1, x2)), levels=20, colors="#1f77b4", linewidths=0.8)
        ax.plot(points[:, 0], points[:, 1], "-o", color="#ff7f0e", ms=4)
        ax.set(title=f"FusedAdagrad, eta {eta:g}: {EPOCHS} steps from {START}", xlabel="x1",
               ylabel="x2")
    plotting.save(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args()
    trajectories = {}
    for eta, (d2l_x1, d2l_x2) in D2L_FINAL.items():
        points = trajectories[eta] = train(eta)
        x1, x2 = points[-1].tolist()
        print(f"eta {eta:g}: epoch {EPOCHS}, x1 {x1:f}, x2 {x2:f} (d2l: {d2l_x1:f}, {d2l_x2:f})")
    plot(args.out, trajectories)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
