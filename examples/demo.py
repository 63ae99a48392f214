"""Trains one recommender-style model four times, side by side: with torch.optim.Adagrad (its
default for-loop), with torch.optim.Adagrad fused=True where torch allows it, with FusedAdagrad, and
with its embedding tables in a FusedEmbeddingBags (stepped inside backward; FusedAdagrad for the
MLP). Its embeddings use sparse=True, as recommender models do, so each step's embedding grads hold
only the rows the batch looked up (the fourth run makes no embedding grads at all). The targets come from a planted model (hidden embeddings and an MLP)
plus noise, so the loss falls toward the noise's variance, the loss of a perfect model. Prints the
loss, whether FusedAdagrad agrees with torch, how much faster its optimizer step is, and writes a
PNG of the losses and step times (--out; needs matplotlib)."""
import argparse
import copy
import pathlib
import statistics
import time

import torch
from torch import nn
from tqdm import tqdm

import fused_adagrad
from fused_adagrad import FusedAdagrad, FusedEmbeddingBags

import plotting

STEPS = 100
BATCH, HISTORY = 512, 20  # each example: one user id and a bag of the 20 items it interacted with
N_USERS, N_ITEMS = 50_000, 200_000
# The planted model: hidden vectors for the most popular 1% of users and items only (the rest are
# neutral, 0). In 100 batches such a user is looked up 22 times on average, such an item 110 times;
# half the other users never, most other items 3 times or fewer. The popular ids are what 100
# steps can learn.
HIDDEN_DIM, HIDDEN_USERS, HIDDEN_ITEMS = 4, N_USERS // 100, N_ITEMS // 100
NOISE_STD = 0.5  # the noise floor: a perfect model's MSE is NOISE_STD ** 2
DEFAULT_OUT = plotting.BUILD / "demo.png"


class Recommender(nn.Module):
    def __init__(self):
        super().__init__()
        # sparse=True: backward yields only the looked-up rows, not a table-sized gradient.
        self.users = nn.Embedding(N_USERS, 32, sparse=True)
        # "sum" as in DLRM.
        self.items = nn.EmbeddingBag(N_ITEMS, 64, mode="sum", sparse=True)
        # Small initial vectors: with nn.Embedding's N(0, 1), a bag of 20 feeds the MLP inputs of
        # size ~4.5, the first step lifts the loss to ~20 and it then stalls near 1.1.
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.01)
        # SiLU, not ReLU: an example whose ReLU input sits at 0 takes its kink one way or the other
        # on a 1-ulp difference, which changes the grads of its rarely seen rows outright, and their
        # next Adagrad steps carry that past the parity tolerance. A smooth activation does not.
        self.mlp = nn.Sequential(nn.Linear(96, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                                 nn.Linear(256, 1))

    def forward(self, users, items):
        return self.mlp(torch.cat([self.users(users), self.items(items)], dim=1))


class FusedTablesRecommender(nn.Module):
    """The same model with both tables in one FusedEmbeddingBags: a user is a bag of one id."""

    def __init__(self, model, **options):
        super().__init__()
        self.tables = FusedEmbeddingBags([(N_USERS, 32), (N_ITEMS, 64)], mode="sum", **options)
        with torch.no_grad():
            for fused, table in zip(self.tables.weights, (model.users, model.items)):
                fused.copy_(table.weight)
        self.mlp = copy.deepcopy(model.mlp)

    def forward(self, users, items):
        # Table 0's bags (one user each), then table 1's (HISTORY items each).
        ids = torch.cat([users, items.flatten()])
        offsets = torch.cat([torch.arange(len(users)), len(users) + torch.arange(0, items.numel(), HISTORY)])
        return self.mlp(self.tables(ids, offsets))


class FusedTablesOptimizer:
    """FusedAdagrad for the MLP; the tables' step already ran in backward (their optimizer.step()
    only marks it as taken)."""

    def __init__(self, model, **options):
        self.tables = model.tables.optimizer
        self.mlp = FusedAdagrad([mlp_group(model.mlp)], **options)

    def zero_grad(self):
        self.mlp.zero_grad()

    def step(self):
        self.tables.step()
        self.mlp.step()


def param_groups(model, **mlp_options):
    # Weight decay would make a sparse grad dense, so torch (and FusedAdagrad) refuse it there.
    # The MLP's lr is a tenth of the embeddings': it steps on every batch, a row only when its id
    # is looked up, and at the embeddings' lr the MLP lifts the loss at step 1 and blows it up
    # later.
    return [{"params": [model.users.weight, model.items.weight], "weight_decay": 0.0},
            mlp_group(model.mlp, **mlp_options)]


def mlp_group(mlp, **options):
    return {"params": list(mlp.parameters()), "weight_decay": 1e-4, "lr": 0.01, **options}


def make_batches(gen, steps):
    """(users, item bags, targets) per step: targets from the planted model plus noise."""
    # Skewed popularity (low ids drawn far more often), so a batch repeats ids as real traffic does.
    def ids(n, shape):
        return (torch.rand(shape, generator=gen) ** 3 * n).long()

    hidden_users = torch.zeros(N_USERS, HIDDEN_DIM)
    hidden_users[:HIDDEN_USERS] = torch.randn(HIDDEN_USERS, HIDDEN_DIM, generator=gen)
    hidden_items = torch.zeros(N_ITEMS, HIDDEN_DIM)
    hidden_items[:HIDDEN_ITEMS] = torch.randn(HIDDEN_ITEMS, HIDDEN_DIM, generator=gen)
    hidden_mlp = (torch.randn(2 * HIDDEN_DIM, 64, generator=gen), torch.randn(64, 1, generator=gen))

    def planted_model(users, items):
        x = torch.cat([hidden_users[users], hidden_items[items].sum(dim=1)], dim=1)
        return torch.relu(x @ hidden_mlp[0]) @ hidden_mlp[1]

    lookups = [(ids(N_USERS, (BATCH,)), ids(N_ITEMS, (BATCH, HISTORY))) for _ in range(steps)]
    signals = [planted_model(users, items) for users, items in lookups]
    # Scaled to mean 0 and variance 1, so the loss starts near 1 + NOISE_STD ** 2.
    mean, std = torch.cat(signals).mean(), torch.cat(signals).std()
    return [(users, items, (signal - mean) / std + NOISE_STD * torch.randn(BATCH, 1, generator=gen))
            for (users, items), signal in zip(lookups, signals)]


def timed_backward_and_step(loss, opt):
    """Backward and the optimizer step, timed together: FusedEmbeddingBags steps in backward."""
    start = time.perf_counter()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def plot(path, losses, step_ms, steps):
    plt = plotting.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(losses["torch default"], lw=4, alpha=0.4, label="torch.optim.Adagrad")
    left.plot(losses["FusedAdagrad"], "k--", lw=1, label="FusedAdagrad")
    left.axhline(NOISE_STD ** 2, color="C2", lw=1, label=f"noise floor ({NOISE_STD ** 2:g})")
    left.set(title="training loss (the two optimizers' curves coincide)", xlabel="step",
             ylabel="MSE loss")
    left.set_ylim(bottom=0)
    left.legend()
    bars = right.bar(list(step_ms), list(step_ms.values()), color=["C0", "C1", "C2", "C3"])
    right.bar_label(bars, fmt="%.2f ms")
    right.set(title=f"backward + optimizer step, median of {steps} ({torch.get_num_threads()} threads)",
              ylabel="ms")
    plotting.save(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"training steps (default {STEPS}; fewer for a quick check)")
    args = parser.parse_args()
    info = fused_adagrad.build_info()
    print(f"fused-adagrad {info['version']} (torch {torch.__version__}, "
          f"CPU kernel {info['cpu_kernel']}, {torch.get_num_threads()} threads)")
    # torch.optim.Adagrad's sparse step builds sparse tensors unchecked (torch's default); saying so
    # explicitly keeps its warning about it out of the output.
    torch.sparse.check_sparse_tensor_invariants.disable()
    torch.manual_seed(0)
    ref_model = Recommender()
    # A small initial sum: an embedding row's grad is tiny (its share of a 512-example mean), and
    # a sum of 0.1 would keep its steps tiny too; 0 would make a rare id's first step lr * sign(g).
    kw = dict(lr=0.1, initial_accumulator_value=1e-4)
    models = {"torch default": ref_model, "torch fused": copy.deepcopy(ref_model),
              "FusedAdagrad": copy.deepcopy(ref_model)}
    opts = {"torch default": torch.optim.Adagrad(param_groups(ref_model), **kw),
            # torch reads "fused" per param group, so one optimizer can mix the two paths.
            "torch fused": torch.optim.Adagrad(param_groups(models["torch fused"], fused=True), **kw),
            "FusedAdagrad": FusedAdagrad(param_groups(models["FusedAdagrad"]), **kw)}
    models["FusedEmbeddingBags"] = FusedTablesRecommender(ref_model, **kw)
    opts["FusedEmbeddingBags"] = FusedTablesOptimizer(models["FusedEmbeddingBags"], **kw)

    batches = make_batches(torch.Generator().manual_seed(1), args.steps)
    rows = statistics.mean(u.unique().numel() + i.unique().numel() for u, i, _ in batches)
    n_params = sum(p.numel() for p in ref_model.parameters())
    print(f"sparse embedding grads: a step touches {rows:,.0f} of {N_USERS + N_ITEMS:,} rows "
          f"({BATCH * (1 + HISTORY):,} ids with repeats); MLP grads dense, weight decay 1e-4")
    print("torch fused=True refuses sparse grads, so its run has fused=True on the dense MLP group "
          "only, the embeddings on torch's default path")

    losses = {name: [] for name in opts}
    times = {name: [] for name in opts}
    bar = tqdm(batches, desc=f"training {n_params / 1e6:.1f} M params x{len(opts)}", unit="step")
    for users, items, target in bar:
        for name, opt in opts.items():
            opt.zero_grad()
            loss = nn.functional.mse_loss(models[name](users, items), target)
            times[name].append(timed_backward_and_step(loss, opt))
            losses[name].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")

    pairs = list(zip(models["FusedAdagrad"].parameters(), ref_model.parameters()))
    worst = max((a - b).abs().max().item() for a, b in pairs)
    if all(torch.equal(a, b) for a, b in pairs):
        verdict = "PASS: parameters bitwise identical to torch.optim.Adagrad"
    elif all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs):
        verdict = (f"PASS: parameters match torch.optim.Adagrad within rtol 1e-4 (max difference "
                   f"{worst:.1e}; ids repeated in a batch are summed in another order than torch's "
                   "coalesce, and torch's MKL sqrt is not correctly rounded on every CPU, ours is)")
    else:
        verdict = f"FAIL: parameters differ from torch.optim.Adagrad by up to {worst:.3e}"
    tables = models["FusedEmbeddingBags"]
    fused_pairs = list(zip([*tables.tables.weights, *tables.mlp.parameters()],
                           models["FusedAdagrad"].parameters()))
    if all(torch.equal(a, b) for a, b in fused_pairs):
        tables_verdict = "PASS: FusedEmbeddingBags' run bitwise identical to FusedAdagrad's"
    else:
        worst_tables = max((a - b).abs().max().item() for a, b in fused_pairs)
        tables_verdict = f"FAIL: FusedEmbeddingBags' run differs from FusedAdagrad's by up to {worst_tables:.3e}"
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ours_loss = losses["FusedAdagrad"]
    window = min(10, len(ours_loss))  # one batch's loss is noisy: mean over 10 steps
    first, last = statistics.mean(ours_loss[:window]), statistics.mean(ours_loss[-window:])
    print(f"loss (FusedAdagrad, mean of {window} steps): first {first:.3f}, last {last:.3f}; "
          f"noise floor {NOISE_STD ** 2:.3f}")
    print(verdict)
    print(tables_verdict)
    ours, bags = ms["FusedAdagrad"], ms["FusedEmbeddingBags"]
    print(f"backward + optimizer step (median of {args.steps}): torch default (for-loop) "
          f"{ms['torch default']:.2f} ms, torch fused=True on the MLP {ms['torch fused']:.2f} ms, "
          f"FusedAdagrad {ours:.2f} ms, FusedEmbeddingBags + FusedAdagrad {bags:.2f} ms "
          f"-> FusedAdagrad {ms['torch default'] / ours:.2f}x, FusedEmbeddingBags "
          f"{ms['torch default'] / bags:.2f}x torch's default")
    plot(args.out, losses, {"torch default\n(for-loop)": ms["torch default"],
                            "torch fused=True\n(MLP only)": ms["torch fused"],
                            "FusedAdagrad": ours, "FusedEmbedding-\nBags": bags}, args.steps)
    return 0 if verdict.startswith("PASS") and tables_verdict.startswith("PASS") else 1


if __name__ == "__main__":
    raise SystemExit(main())
