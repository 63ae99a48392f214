"""Peak memory of one training step (forward, backward, optimizer step) on the CPU, with
FusedAdagrad's plain step and with step_in_backward=True, on a BERT-base-shaped model.

    python benchmarks/bench_step_in_backward.py [--batch 2 --seq 64] [--out benchmarks/results]

The peak is the process's resident-memory high-water mark during the step above its resident
size before it (params and optimizer state are there already), read from /proc/self/status
after resetting the mark (Linux). With the plain step,
every param's grad is alive at once when backward ends; with step_in_backward each grad is
stepped and freed as soon as it is complete, while backward still runs. The saving shows where
grads, not activations, set the peak (small batches of a big model: the default); with large
activations the peak comes early in backward, before many grads exist, and both are alike. Also reports the median
step time of each (a few steps, after a warm-up one), and that both give the same params.
"""
import argparse
import ctypes
import datetime
import os
import statistics
import time

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad
from results_io import write_results


class BertShaped(torch.nn.Module):
    """BERT-base's parameter shapes (110 M) in a model whose forward uses every one of them:
    embeddings, 12 layers of attention projections, feed-forward and LayerNorms, a pooler."""

    def __init__(self, vocab=30522, hidden=768, ffn=3072, layers=12):
        super().__init__()
        self.words = torch.nn.Embedding(vocab, hidden)
        self.positions = torch.nn.Embedding(512, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            self.layers.append(torch.nn.ModuleDict({
                "q": torch.nn.Linear(hidden, hidden), "k": torch.nn.Linear(hidden, hidden),
                "v": torch.nn.Linear(hidden, hidden), "out": torch.nn.Linear(hidden, hidden),
                "norm1": torch.nn.LayerNorm(hidden), "up": torch.nn.Linear(hidden, ffn),
                "down": torch.nn.Linear(ffn, hidden), "norm2": torch.nn.LayerNorm(hidden)}))
        self.pooler = torch.nn.Linear(hidden, hidden)

    def forward(self, ids):
        x = self.norm(self.words(ids) + self.positions(torch.arange(ids.shape[1])))
        for layer in self.layers:
            q, k, v = layer["q"](x), layer["k"](x), layer["v"](x)
            attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
            x = layer["norm1"](x + layer["out"](attention))
            x = layer["norm2"](x + layer["down"](torch.nn.functional.gelu(layer["up"](x))))
        return torch.tanh(self.pooler(x[:, 0])).pow(2).mean()


def one_step(model, opt, ids):
    opt.zero_grad()
    model(ids).backward()
    opt.step()


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(model, opt, ids):
    """The process's resident-memory high-water mark during one step, above its level before it
    (Linux: /proc/self/clear_refs resets the mark). Allocations of 64 KiB and more are mapped
    and unmapped on their own (mallopt below), so freed tensors leave the resident set."""
    opt.zero_grad()  # the last step's grads (plain step) are not part of the baseline
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    one_step(model, opt, ids)
    return (status_kib("VmHWM") - before) * 1024


def measure(step_in_backward, ids, steps):
    torch.manual_seed(0)
    model = BertShaped()
    opt = FusedAdagrad(model.parameters(), lr=0.01, step_in_backward=step_in_backward)
    one_step(model, opt, ids)  # warm-up: first-use allocations
    peak = peak_extra_bytes(model, opt, ids)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step(model, opt, ids)
        times.append(time.perf_counter() - start)
    return model, peak, statistics.median(times)


def main():
    # glibc's mmap threshold grows as big blocks are freed, after which freed tensors stay
    # resident and hide the next step's peak: pin it (M_MMAP_THRESHOLD is -3).
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    ids = torch.randint(0, 30522, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    plain_model, plain_peak, plain_s = measure(False, ids, args.steps)
    hooked_model, hooked_peak, hooked_s = measure(True, ids, args.steps)
    same = all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), hooked_model.parameters()))
    params = sum(p.numel() for p in plain_model.parameters())
    grad_mib = params * 4 / 2**20

    info = fused_adagrad.build_info()
    stamp = datetime.date.today().isoformat()
    lines = [
        f"- Machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, fused-adagrad {info['version']} ({info['cpu_kernel']} kernel)",
        f"- Model: BERT-base-shaped, {params / 1e6:.1f} M float32 params ({grad_mib:.0f} MiB of "
        f"grads), batch {args.batch} x {args.seq} tokens",
        f"- Date: {stamp}",
        f"- Command: python benchmarks/bench_step_in_backward.py --batch {args.batch} --seq {args.seq}",
        f"- Same params after {args.steps + 2} steps: {'yes, bitwise' if same else 'NO'}",
        "",
        "| FusedAdagrad | peak extra memory of a step | step time (median) |",
        "|---|---:|---:|",
        f"| plain step | {plain_peak / 2**20:.0f} MiB | {plain_s * 1e3:.0f} ms |",
        f"| step_in_backward=True | {hooked_peak / 2**20:.0f} MiB | {hooked_s * 1e3:.0f} ms |",
        f"| saved | {(plain_peak - hooked_peak) / 2**20:.0f} MiB "
        f"({100 * (1 - hooked_peak / plain_peak):.0f} %) | |",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, f"step-in-backward-{stamp}", text,
                  {"date": stamp, "params": params, "batch": args.batch, "seq": args.seq,
                   "plain": {"peak_bytes": plain_peak, "median_s": plain_s},
                   "step_in_backward": {"peak_bytes": hooked_peak, "median_s": hooked_s},
                   "same_params": same})
    if not same:
        raise SystemExit("step_in_backward gave other params than the plain step")


if __name__ == "__main__":
    main()
