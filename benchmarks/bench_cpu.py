"""CPU benchmark: FusedAdagrad against torch.optim.Adagrad's for-loop, foreach and fused paths.

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/results]

Cases: BERT-base's parameter list (built from its shapes, ~110 M params), 1000 small tensors and
one 64 M-element tensor, in float32 and bfloat16. For each: median ms per step, GB/s at the bytes a
step must move (read param, grad, sum; write param, sum), the share of a streaming-bandwidth
probe measured in the same run, speedup over each PyTorch path, and bytes allocated by one step.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad
from model_shapes import bert_base_shapes, small_shapes


CASES = {
    "BERT-base": bert_base_shapes,
    "1000 small tensors": small_shapes,
    "one 64M tensor": lambda: [(64 * 1024 * 1024,)],
}

PATHS = {
    "torch for-loop": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=False),
    "torch foreach": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=True),
    "torch fused": lambda ps: torch.optim.Adagrad(ps, lr=0.01, fused=True),
    "fused-adagrad": lambda ps: FusedAdagrad(ps, lr=0.01),
}


def median_seconds(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def streaming_bandwidth(iters=10):
    """Best of copy (8 B/element) and add (12 B/element) on 64 M float32: the machine's practical
    streaming bandwidth with torch's own threads, in GB/s."""
    n = 64 * 1024 * 1024
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    copy_s = median_seconds(lambda: c.copy_(a), iters)
    add_s = median_seconds(lambda: torch.add(a, b, out=c), iters)
    return max(8 * n / copy_s, 12 * n / add_s) / 1e9


def allocated_bytes(opt):
    """Bytes the CPU allocator hands out during one step (temporaries included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        opt.step()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def run_case(shapes, dtype, iters):
    numel = sum(torch.Size(s).numel() for s in shapes)
    bytes_per_step = numel * dtype.itemsize * 5  # read p, g, sum; write p, sum
    results = {}
    for name, make in PATHS.items():
        gc.collect()
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=dtype) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        seconds = median_seconds(opt.step, iters)
        results[name] = {"ms": seconds * 1e3, "GB/s": bytes_per_step / seconds / 1e9,
                         "alloc_bytes": allocated_bytes(opt)}
        del opt, params
    return numel, results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    iters = 3 if args.quick else 10

    info = fused_adagrad.build_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    machine = (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}, fused-adagrad {info['version']} ({info['cpu_kernel']} kernel)")
    probe = streaming_bandwidth()
    print(f"{machine}\nstreaming probe: {probe:.1f} GB/s")

    rows, raw = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for case, shapes_fn in CASES.items():
            shapes = shapes_fn()
            numel, res = run_case(shapes, dtype, iters)
            ours = res["fused-adagrad"]
            best_torch = min(res[k]["ms"] for k in res if k != "fused-adagrad")
            for name, r in res.items():
                rows.append(
                    f"| {case} | {str(dtype).removeprefix('torch.')} | {name} | {r['ms']:.2f} | "
                    f"{r['GB/s']:.1f} | {100 * r['GB/s'] / probe:.0f} % | "
                    f"{r['ms'] / ours['ms']:.2f}x | {r['alloc_bytes'] / 2**20:.1f} MiB |")
                print(rows[-1])
            raw.append({"case": case, "dtype": str(dtype), "numel": numel, "tensors": len(shapes),
                        "results": res, "ours_vs_best_torch": best_torch / ours["ms"]})

    table = "\n".join(
        ["| case | dtype | path | ms/step (median) | GB/s | of probe | fused-adagrad speedup | allocated per step |",
         "|---|---|---|---:|---:|---:|---:|---:|"] + rows)
    stamp = datetime.date.today().isoformat()
    header = (f"Machine: {machine}\nStreaming probe (best of copy/add, 64 M float32): {probe:.1f} GB/s\n"
              f"Date: {stamp}\nCommand: python benchmarks/bench_cpu.py{' --quick' if args.quick else ''}\n")
    print("\n" + header + "\n" + table)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"machine": machine, "probe_GBps": probe, "date": stamp, "cases": raw}, f, indent=1)
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
