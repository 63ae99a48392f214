"""Embedding-table benchmark: the sparse step of FusedAdagrad (exact Adagrad) and RowWiseAdagrad
(one accumulator per row) against torch.optim.Adagrad's.

    python benchmarks/bench_sparse.py [--quick] [--out benchmarks/results]

A 1M x 128 table (float32 and bfloat16) with an uncoalesced COO grad as nn.Embedding(sparse=True)
makes it: (a) 4 096 uniform ids plus 512 repeats of them, (b) 16 384 Zipf-distributed ids (hot rows
repeat many times). The same grad every step, so only the optimizer is timed. Each case twice:
the table on 4 KiB pages (torch.zeros, the default), and on 2 MiB pages (what PyTorch's
THP_MEM_ALLOC_ENABLE=1 gives every large tensor, torch's Adagrad state included). Our optimizers
put their own state on 2 MiB pages either way. Reports the median ms per step, the bytes the
touched rows must move (read the grad values, read and write the touched rows of param and sum;
row-wise: one sum value per row), their share of the streaming probe timed in turns with the
steps, the optimizer state's size and the peak extra memory of a step (the resident set's peak
above its start: every allocation counts, the library's sort buffers included).
"""
import argparse
import datetime
import os
import platform
import statistics

import numpy as np
import torch

import fused_adagrad
from bench_cpu import StreamingProbe, peak_extra_bytes, seconds
from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from results_io import write_results

ROWS, ROW_LEN = 1_000_000, 128

PATHS = {
    "torch sparse (for-loop)": lambda ps: torch.optim.Adagrad(ps, lr=0.01),
    "fused-adagrad exact sparse": lambda ps: FusedAdagrad(ps, lr=0.01),
    "fused-adagrad row-wise sparse": lambda ps: RowWiseAdagrad(ps, lr=0.01),
}


def uniform_ids(rng):
    ids = rng.choice(ROWS, 4096, replace=False)
    return np.concatenate([ids, rng.choice(ids, 512)])


def zipf_ids(rng, count=16384):
    ranks = (rng.zipf(1.2, count) - 1) % ROWS
    return rng.permutation(ROWS)[ranks]  # hot rows scattered over the table


DISTRIBUTIONS = {"uniform 4096 + 512 repeats": uniform_ids, "Zipf 16384": zipf_ids}


def table(dtype, huge_pages):
    p = torch.empty(ROWS, ROW_LEN, dtype=dtype)
    if huge_pages:  # before the first write, as THP_MEM_ALLOC_ENABLE=1 does in torch's allocator
        fused_adagrad._C.advise_huge_pages(p)
    return p.zero_()


def run_case(ids, dtype, iters, probe, huge_pages):
    rng = torch.Generator().manual_seed(0)
    values = torch.randn(len(ids), ROW_LEN, generator=rng).to(dtype)
    grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], values, (ROWS, ROW_LEN))
    unique = len(np.unique(ids))
    item = dtype.itemsize

    def bytes_per_step(name):  # grad values read; param (and sum) rows read and written
        if "row-wise" in name:
            return len(ids) * ROW_LEN * item + unique * (ROW_LEN * item + 4) * 2
        return len(ids) * ROW_LEN * item + unique * ROW_LEN * item * 4
    optimizers = {}
    for name, make in PATHS.items():
        p = table(dtype, huge_pages)
        p.grad = grad
        optimizers[name] = make([p])
        if huge_pages and name.startswith("torch"):  # torch's state too, as that variable gives it
            optimizers[name].state[p]["sum"] = table(dtype, True)
    times = {name: [] for name in optimizers}
    probe_times = []
    for name, opt in optimizers.items():
        opt.step()  # warm-up
    for _ in range(iters):
        for name, opt in optimizers.items():
            times[name].append(seconds(opt.step))
        probe_times.append(probe.time_once())
    probe_gbs = probe.bytes / statistics.median(probe_times) / 1e9
    rows = []
    times_torch = statistics.median(times["torch sparse (for-loop)"])
    for name, opt in optimizers.items():
        t = statistics.median(times[name])
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
        gbs = bytes_per_step(name) / t / 1e9
        rows.append({
            "path": name, "ms": t * 1e3, "min_ms": min(times[name]) * 1e3,
            "max_ms": max(times[name]) * 1e3, "gbs": gbs, "bytes_per_step": bytes_per_step(name),
            "of_probe": gbs / probe_gbs, "speedup_of_torch": times_torch / t,
            "state_mib": state / 2**20, "peak_mib": peak_extra_bytes(opt.step) / 2**20,
        })
    return {"ids": len(ids), "unique_rows": unique, "probe_gbs": probe_gbs, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations, float32 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    iters = 10 if args.quick else 60
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    info = fused_adagrad.build_info()
    probe = StreamingProbe()
    date = datetime.date.today().isoformat()
    header = [
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, fused-adagrad "
        f"{info['version']} ({info['cpu_kernel']} kernel)",
        f"- Table: {ROWS:,} x {ROW_LEN}, the same uncoalesced grad every step; median of {iters} steps",
        f"- Date: {date}",
        "- Command: python benchmarks/bench_sparse.py",
    ]
    results = []
    lines = ["| ids | dtype | table pages | path | ms/step (median) | min-max | touched GB/s | of probe | "
             "vs torch | state | peak extra memory of a step |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in dtypes:
        for dist, make_ids in DISTRIBUTIONS.items():
            for huge_pages in (False, True):
                ids = make_ids(np.random.default_rng(0))
                case = run_case(ids, dtype, iters, probe, huge_pages)
                pages = "2 MiB" if huge_pages else "4 KiB"
                case.update(distribution=dist, dtype=str(dtype).replace("torch.", ""), table_pages=pages)
                results.append(case)
                for r in case["rows"]:
                    lines.append(
                        f"| {dist} ({case['unique_rows']} rows) | {case['dtype']} | {pages} | {r['path']} | "
                        f"{r['ms']:.3f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['gbs']:.1f} | "
                        f"{100 * r['of_probe']:.0f} % | {r['speedup_of_torch']:.1f}x | "
                        f"{r['state_mib']:.0f} MiB | {r['peak_mib']:.2f} MiB |")
                print(*lines[-len(case["rows"]):], sep="\n", flush=True)
    probes = [c["probe_gbs"] for c in results]
    header.append(f"- Streaming probe (in-place add, timed in turns): {min(probes):.1f} to {max(probes):.1f} GB/s")
    text = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, f"sparse-cpu-{date}", "# Sparse (embedding table) step, CPU\n\n" + text,
                  {"header": header, "cases": results})


if __name__ == "__main__":
    main()
