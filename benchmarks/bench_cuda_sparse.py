"""CUDA benchmark of the embedding-table paths: the sparse step (FusedAdagrad exact, RowWiseAdagrad)
against torch.optim.Adagrad's CUDA sparse path, and the DLRM-like training step of
FusedEmbeddingBags against nn.EmbeddingBag(sparse=True) + an optimizer.

    python benchmarks/bench_cuda_sparse.py [--quick] [--out benchmarks/results]

Sparse step: bench_sparse.py's 1M x 128 table and id distributions (uniform 4 096 + 512 repeats,
Zipf 16 384), plus a Zipf batch 16 times larger; the same uncoalesced grad every step.
Embedding bags: bench_embedding_bags.py's case (8 tables x 1M x 64, batch 2 048, 20 ids per bag
per table, sum pooling), contenders (a)-(e) as there, forward + backward + update per step.

Method. Contenders are timed in turns; each call is timed from the host with the device
synchronized before and after (so launch overhead and any host synchronization inside the step
count, as a training loop pays them), after an untimed flush of the L2 cache. Medians, min-max.
Host synchronization: each contender's step is run once more under
torch.cuda.set_sync_debug_mode("error"), which raises on a synchronizing call torch makes; the
table says "none seen" or the call that synchronized. That mode is a prototype that misses some
calls: on the H200 it saw none in torch's own sparse step, which coalesces the grad. Peak extra memory: torch's allocator peak
above what was allocated at the step's start. Writes <out>/cuda-sparse-<device>-<date>.md/.json.
"""
import argparse
import datetime
import os
import statistics
import sys

import numpy as np
import torch
from torch import nn

import bench_embedding_bags as bags_bench
import bench_sparse
import fused_adagrad
from bench_cuda import Timer, device_slug, extra_memory, release
from results_io import write_results

CHECK_SYNCS = True  # --no-sync-check turns it off
DISTRIBUTIONS = dict(bench_sparse.DISTRIBUTIONS)
DISTRIBUTIONS["Zipf 262144"] = lambda rng: bench_sparse.zipf_ids(rng, 16 * 16384)


def host_syncs(fn):
    """'none seen', or the first line of the error a synchronizing call raised."""
    if not CHECK_SYNCS:
        return "not checked"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        verdict = "none seen"
    except RuntimeError as e:
        verdict = "syncs: " + str(e).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return verdict


def timed_in_turns(steps, timer, iters, warmup):
    times = {name: [] for name in steps}
    for turn in range(warmup + iters):
        for name, fn in steps.items():
            ms = timer.host_ms(fn)
            if turn >= warmup:
                times[name].append(ms)
    return times


def summary(times, name, base):
    t = statistics.median(times[name])
    return {"path": name, "ms": t, "min_ms": min(times[name]), "max_ms": max(times[name]),
            "speedup": statistics.median(times[base]) / t}


def sparse_case(ids, dtype, timer, iters, warmup):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, row_len = bench_sparse.ROWS, bench_sparse.ROW_LEN
    values = torch.randn(len(ids), row_len, device="cuda", generator=gen).to(dtype)
    index = torch.from_numpy(ids).cuda()[None]
    grad = torch.sparse_coo_tensor(index, values, (rows, row_len))
    optimizers = {}
    for name, make in bench_sparse.PATHS.items():
        p = torch.zeros(rows, row_len, dtype=dtype, device="cuda")
        p.grad = grad
        optimizers[name] = make([p])
        optimizers[name].step()  # state created before timing
    steps = {name: opt.step for name, opt in optimizers.items()}
    times = timed_in_turns(steps, timer, iters, warmup)
    base = "torch sparse (for-loop)"
    out = [dict(summary(times, name, base), peak_mib=extra_memory(fn) / 2**20, syncs=host_syncs(fn))
           for name, fn in steps.items()]
    del optimizers, steps
    release()
    return out


def bags_case(dtype, distribution, timer, iters, warmup):
    torch.manual_seed(0)
    tables = [nn.EmbeddingBag(bags_bench.ROWS, bags_bench.DIM, mode="sum", sparse=True,
                              dtype=dtype, device="cuda") for _ in range(bags_bench.TABLES)]
    paths = bags_bench.contenders(tables)
    batches = [(i.cuda(), o.cuda()) for i, o in bags_bench.make_batches(distribution, 4)]
    weighting = torch.randn(bags_bench.BATCH, bags_bench.TABLES * bags_bench.DIM, device="cuda",
                            dtype=dtype)
    turn = iter(range(10**9))

    def step_of(path):
        return lambda: bags_bench.training_step(path, batches[next(turn) % 4], weighting)
    steps = {name: step_of(path) for name, path in paths.items()}
    times = timed_in_turns(steps, timer, iters, warmup)
    out = [dict(summary(times, name, "(a) EmbeddingBag + torch.optim.Adagrad"),
                peak_mib=extra_memory(fn) / 2**20, syncs=host_syncs(fn)) for name, fn in steps.items()]
    del paths, steps, tables
    release()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps, float32 only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-sync-check", action="store_true",
                    help="skip the run under torch.cuda.set_sync_debug_mode('error')")
    args = ap.parse_args()
    global CHECK_SYNCS
    CHECK_SYNCS = not args.no_sync_check
    if not torch.cuda.is_available() or not fused_adagrad.build_info()["cuda"]:
        sys.exit("bench_cuda_sparse: needs a CUDA device and fused_adagrad built with CUDA")
    iters, warmup = (5, 2) if args.quick else (30, 5)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    props = torch.cuda.get_device_properties(0)
    info = fused_adagrad.build_info()
    date = datetime.date.today().isoformat()
    header = [f"- Device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"fused-adagrad {info['version']}",
              f"- Date: {date}; median of {iters} calls after {warmup} warm-up turns, host-timed "
              "with the device synchronized before and after, L2 flushed before each call",
              "- Command: python benchmarks/bench_cuda_sparse.py"]
    print(*header, sep="\n", flush=True)
    timer = Timer()
    lines = ["| case | dtype | path | ms (median) | min-max | speedup | peak extra | host sync |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    cases = []

    def add(case, dtype, rows):
        cases.append({"case": case, "dtype": str(dtype)[6:], "rows": rows})
        for r in rows:
            lines.append(f"| {case} | {str(dtype)[6:]} | {r['path']} | {r['ms']:.3f} | "
                         f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['speedup']:.1f}x | "
                         f"{r['peak_mib']:.1f} MiB | {r['syncs']} |")
            print(lines[-1], flush=True)
    for dtype in dtypes:
        for dist, make_ids in DISTRIBUTIONS.items():
            ids = make_ids(np.random.default_rng(0))
            add(f"sparse step, {dist} ids ({len(np.unique(ids))} rows)", dtype,
                sparse_case(ids, dtype, timer, iters, warmup))
    for dtype in dtypes:
        for dist in ("Zipf(1.2)", "uniform"):
            add(f"embedding bags training step, {dist}", dtype,
                bags_case(dtype, dist, timer, iters, warmup))
    text = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    write_results(args.out, f"cuda-sparse-{device_slug(props.name)}-{date}",
                  "# Embedding tables on CUDA: sparse step and embedding-bag training step\n\n"
                  + text, {"header": header, "cases": cases})


if __name__ == "__main__":
    main()
