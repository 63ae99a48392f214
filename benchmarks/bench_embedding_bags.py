"""DLRM-like embedding-bag training step: FusedEmbeddingBags (the Adagrad step inside backward)
against nn.EmbeddingBag(sparse=True) stepped by an optimizer afterwards.

    python benchmarks/bench_embedding_bags.py [--quick] [--out benchmarks/results]

8 tables x 1M rows x 64 (float32, and a bfloat16 variant), batch 2 048, 20 ids per bag per table,
sum pooling, Zipf(1.2) and uniform ids. One training step = forward, backward, update (and, for
the unfused paths, optimizer.step() and zero_grad()), the loss a fixed weighting of the pooled
rows. Contenders, timed in turns (one step each, repeat; medians): (a) nn.EmbeddingBag(sparse=True)
+ torch.optim.Adagrad, (b) the same + FusedAdagrad, (c) the same + RowWiseAdagrad, (d)
FusedEmbeddingBags exact, (e) FusedEmbeddingBags row-wise. (a)-(c) share one set of tables;
(d) and (e) have their own copies; each optimizer its own state.

Peak extra memory: the resident set's peak above its size at the step's start (Linux: VmHWM,
reset through /proc/self/clear_refs, after malloc_trim so that freed memory is not reused
unseen), for one step and for its backward alone. It counts every allocation (torch's, the
library's own buffers, the sparse grads), not only torch's allocator.
"""
import argparse
import datetime
import os
import platform
import statistics

import numpy as np
import torch
from torch import nn

import fused_adagrad
from bench_cpu import peak_extra_bytes, seconds
from fused_adagrad import FusedAdagrad, FusedEmbeddingBags, RowWiseAdagrad
from results_io import cpu_model, write_results

TABLES, ROWS, DIM = 8, 1_000_000, 64
BATCH, POOLING = 2048, 20

def make_ids(distribution, rng):
    n = TABLES * BATCH * POOLING
    if distribution == "uniform":
        return rng.integers(0, ROWS, n)
    ranks = (rng.zipf(1.2, n) - 1) % ROWS
    return rng.permutation(ROWS)[ranks]  # hot rows scattered over the table


def make_batches(distribution, count):
    rng = np.random.default_rng(0)
    offsets = torch.arange(0, TABLES * BATCH * POOLING, POOLING)
    return [(torch.from_numpy(make_ids(distribution, rng)), offsets) for _ in range(count)]


class Unfused:
    """nn.EmbeddingBag(sparse=True) tables and an optimizer stepping them after backward."""

    def __init__(self, bags, optimizer):
        self.bags, self.opt = bags, optimizer

    def forward(self, indices, offsets):
        per_table = indices.view(TABLES, -1)  # every table has BATCH bags of POOLING ids
        local = offsets[:BATCH]
        return torch.cat([bag(per_table[t], local) for t, bag in enumerate(self.bags)], 1)

    def finish(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Fused:
    def __init__(self, module):
        self.module = module

    def forward(self, indices, offsets):
        return self.module(indices, offsets)

    def finish(self):
        self.module.optimizer.step()


def training_step(path, batch, weighting):
    out = path.forward(*batch)
    (out * weighting).sum().backward()
    path.finish()


def backward_peak(path, batch, weighting):
    out = path.forward(*batch)
    loss = (out * weighting).sum()
    peak = peak_extra_bytes(loss.backward)
    path.finish()
    return peak


def contenders(bags):
    """(a)-(e) over these tables: (a)-(c) step them, (d) and (e) step copies of them."""
    params = [b.weight for b in bags]
    return {
        "(a) EmbeddingBag + torch.optim.Adagrad": Unfused(bags, torch.optim.Adagrad(params, lr=0.01)),
        "(b) EmbeddingBag + FusedAdagrad": Unfused(bags, FusedAdagrad(params, lr=0.01)),
        "(c) EmbeddingBag + RowWiseAdagrad": Unfused(bags, RowWiseAdagrad(params, lr=0.01)),
        "(d) FusedEmbeddingBags, exact": Fused(FusedEmbeddingBags.from_embedding_bags(bags, lr=0.01)),
        "(e) FusedEmbeddingBags, row-wise": Fused(
            FusedEmbeddingBags.from_embedding_bags(bags, optimizer="rowwise", lr=0.01)),
    }


def run_case(dtype, distribution, iters, warmup=2):
    torch.manual_seed(0)
    bags = [nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True, dtype=dtype) for _ in range(TABLES)]
    paths = contenders(bags)
    batches = make_batches(distribution, 4)
    weighting = torch.randn(BATCH, TABLES * DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    times = {name: [] for name in paths}
    for turn in range(warmup + iters):
        batch = batches[turn % len(batches)]
        for name, path in paths.items():
            t = seconds(lambda: training_step(path, batch, weighting))
            if turn >= warmup:
                times[name].append(t)
    ids = batches[0][0].view(TABLES, -1)
    distinct = sum(len(torch.unique(ids[t])) for t in range(TABLES)) / TABLES
    rows = []
    base = statistics.median(times["(a) EmbeddingBag + torch.optim.Adagrad"])
    for name, path in paths.items():
        t = statistics.median(times[name])
        rows.append({
            "path": name, "ms": t * 1e3, "min_ms": min(times[name]) * 1e3,
            "max_ms": max(times[name]) * 1e3, "speedup_of_a": base / t,
            "step_peak_mib": peak_extra_bytes(lambda: training_step(path, batches[0], weighting)) / 2**20,
            "backward_peak_mib": backward_peak(path, batches[1], weighting) / 2**20,
        })
    return {"dtype": str(dtype).replace("torch.", ""), "distribution": distribution,
            "distinct_rows_per_table": distinct, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps, float32 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    iters = 5 if args.quick else 15
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    info = fused_adagrad.build_info()
    date = datetime.date.today().isoformat()
    header = [
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, fused-adagrad {info['version']} "
        f"({info['cpu_kernel']} kernel), {platform.machine()}",
        f"- {TABLES} tables x {ROWS:,} rows x {DIM}, batch {BATCH}, {POOLING} ids per bag per "
        f"table, sum pooling; median of {iters} training steps (forward + backward + update), "
        "contenders timed in turns",
        f"- Date: {date}",
        "- Command: python benchmarks/bench_embedding_bags.py",
    ]
    lines = ["| ids | dtype | path | ms/step (median) | min-max | vs (a) | peak extra, step | "
             "peak extra, backward |", "|---|---|---|---:|---:|---:|---:|---:|"]
    cases = []
    for dtype in dtypes:
        for distribution in ("Zipf(1.2)", "uniform"):
            case = run_case(dtype, distribution, iters)
            cases.append(case)
            for r in case["rows"]:
                lines.append(
                    f"| {distribution} ({case['distinct_rows_per_table']:.0f} distinct rows per "
                    f"table) | {case['dtype']} | {r['path']} | {r['ms']:.1f} | "
                    f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['speedup_of_a']:.2f}x | "
                    f"{r['step_peak_mib']:.0f} MiB | {r['backward_peak_mib']:.0f} MiB |")
            print(*lines[-len(case["rows"]):], sep="\n", flush=True)
    text = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, f"embedding-bags-cpu-{date}",
                  "# Embedding bags: training step, CPU\n\n" + text, {"header": header, "cases": cases})


if __name__ == "__main__":
    main()
