"""CPU benchmark: FusedAdagrad against torch.optim.Adagrad's for-loop, foreach and fused paths.

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/results]

Cases: BERT-base's parameter list (built from its shapes, ~110 M params), 1000 small tensors and
one 64 M-element tensor, in float32, bfloat16 and float16. For each: median ms per step, GB/s at the bytes a
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


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class StreamingProbe:
    """The machine's streaming bandwidth with torch's own threads: an in-place add on 64 M float32
    (12 B/element). It reads and writes the same lines, as an Adagrad step does, so its writes
    cost no read-for-ownership (a copy or an out-of-place add would pay one that bytes-moved
    counting does not see, and understate what a read-modify-write kernel can reach)."""

    def __init__(self, n=64 * 1024 * 1024):
        self.a, self.b = torch.rand(n), torch.rand(n)
        self.bytes = 12 * n

    def time_once(self):
        return seconds(lambda: self.a.add_(self.b))


def allocated_bytes(opt):
    """Bytes the CPU allocator hands out during one step (temporaries included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        opt.step()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def run_case(shapes, dtype, iters, probe, warmup=2):
    """Times every path and the probe in turns (path 1, ..., path 4, probe; repeat), so that a
    bandwidth drift of a shared host hits all of them alike; medians over the turns."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    bytes_per_step = numel * dtype.itemsize * 5  # read p, g, sum; write p, sum
    optimizers = {}
    for name, make in PATHS.items():
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=dtype) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[name] = make(params)
    times = {name: [] for name in optimizers}
    probe_times = []
    for turn in range(warmup + iters):
        for name, opt in optimizers.items():
            t = seconds(opt.step)
            if turn >= warmup:
                times[name].append(t)
        t = probe.time_once()
        if turn >= warmup:
            probe_times.append(t)
    results = {}
    for name, opt in optimizers.items():
        median = statistics.median(times[name])
        results[name] = {"ms": median * 1e3, "GB/s": bytes_per_step / median / 1e9,
                         "alloc_bytes": allocated_bytes(opt)}
    optimizers.clear()
    gc.collect()
    return numel, results, probe.bytes / statistics.median(probe_times) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    iters = 3 if args.quick else 15

    info = fused_adagrad.build_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    machine = (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}, fused-adagrad {info['version']} ({info['cpu_kernel']} kernel)")
    probe = StreamingProbe()
    print(machine)

    raw = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for case, shapes_fn in CASES.items():
            shapes = shapes_fn()
            numel, res, probe_gbps = run_case(shapes, dtype, iters, probe)
            best_torch = min(res[k]["ms"] for k in res if k != "fused-adagrad")
            raw.append({"case": case, "dtype": str(dtype), "numel": numel, "tensors": len(shapes),
                        "probe_GBps": probe_gbps, "results": res,
                        "ours_vs_best_torch": best_torch / res["fused-adagrad"]["ms"]})
            print(f"{case}, {dtype}: probe {probe_gbps:.1f} GB/s, " +
                  ", ".join(f"{k} {r['ms']:.2f} ms" for k, r in res.items()))

    rows = []
    for entry in raw:
        ours_ms = entry["results"]["fused-adagrad"]["ms"]
        for name, r in entry["results"].items():
            rows.append(
                f"| {entry['case']} | {entry['dtype'].removeprefix('torch.')} | {name} | {r['ms']:.2f} | "
                f"{r['GB/s']:.1f} | {100 * r['GB/s'] / entry['probe_GBps']:.0f} % | "
                f"{r['ms'] / ours_ms:.2f}x | {r['alloc_bytes'] / 2**20:.1f} MiB |")
    probes = [entry["probe_GBps"] for entry in raw]

    table = "\n".join(
        ["| case | dtype | path | ms/step (median) | GB/s | of probe | fused-adagrad speedup | allocated per step |",
         "|---|---|---|---:|---:|---:|---:|---:|"] + rows)
    stamp = datetime.date.today().isoformat()
    header = (f"- Machine: {machine}\n"
              f"- Streaming probe (in-place add, 64 M float32, timed in turns with each case's steps): "
              f"{min(probes):.1f} to {max(probes):.1f} GB/s\n"
              f"- Date: {stamp}\n- Command: python benchmarks/bench_cpu.py{' --quick' if args.quick else ''}\n")
    print("\n" + header + "\n" + table)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"machine": machine, "date": stamp, "cases": raw}, f, indent=1)
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
