"""What 2 MiB pages give a sparse step: bench_sparse.py's 1M x 128 float32 table and ids, with
our optimizers' table and state on 4 KiB pages (state swapped for a copy the allocator made as
usual), with the state on 2 MiB pages (as the optimizers now make it) and with both on 2 MiB
pages (the table as THP_MEM_ALLOC_ENABLE=1 would allocate it). All three in one process, steps
timed in turns with the streaming probe between rounds, so the rows start cold and a drift of
the shared host hits every variant alike.

    python benchmarks/bench_huge_pages.py [--iters 60] [--out benchmarks/results]
"""
import argparse
import datetime
import os
import statistics

import numpy as np
import torch

from bench_cpu import StreamingProbe, seconds
from bench_sparse import DISTRIBUTIONS, ROW_LEN, ROWS, table
from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from results_io import cpu_model, write_results

VARIANTS = {  # name: (table on 2 MiB pages, state on 2 MiB pages)
    "table and state on 4 KiB pages": (False, False),
    "state on 2 MiB pages": (False, True),
    "table and state on 2 MiB pages": (True, True),
}


def run_case(opt_cls, ids, iters, probe):
    values = torch.randn(len(ids), ROW_LEN, generator=torch.Generator().manual_seed(0))
    grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], values, (ROWS, ROW_LEN))
    optimizers = {}
    for name, (huge_table, huge_state) in VARIANTS.items():
        p = table(torch.float32, huge_table)
        p.grad = grad
        opt = opt_cls([p], lr=0.01)
        if not huge_state:
            opt.state[p]["sum"] = torch.zeros_like(opt.state[p]["sum"])  # the allocator's pages
        opt.step()  # warm-up
        optimizers[name] = opt
    times = {name: [] for name in optimizers}
    for _ in range(iters):
        for name, opt in optimizers.items():
            times[name].append(seconds(opt.step))
        probe.time_once()
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    probe = StreamingProbe()
    date = datetime.date.today().isoformat()
    lines = ["| ids | optimizer | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---:|" * len(VARIANTS)]
    results = []
    for dist, make_ids in DISTRIBUTIONS.items():
        for opt_cls in (FusedAdagrad, RowWiseAdagrad):
            ms = run_case(opt_cls, make_ids(np.random.default_rng(0)), args.iters, probe)
            base = ms[next(iter(VARIANTS))]
            cells = [f"{t * 1e3:.3f} ms" + ("" if t == base else f" ({t / base - 1:+.0%})")
                     for t in ms.values()]
            lines.append(f"| {dist} | {opt_cls.__name__} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            results.append({"ids": dist, "optimizer": opt_cls.__name__, "seconds": ms})
    header = [f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
              f"threads, torch {torch.__version__}",
              f"- Table: {ROWS:,} x {ROW_LEN} float32, median ms per step over {args.iters} rounds",
              f"- Date: {date}", "- Command: python benchmarks/bench_huge_pages.py"]
    text = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, f"huge-pages-cpu-{date}", "# Sparse step and page size, CPU\n\n" + text,
                  {"header": header, "cases": results})


if __name__ == "__main__":
    main()
