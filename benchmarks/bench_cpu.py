"""CPU benchmark: FusedAdagrad against torch.optim.Adagrad's for-loop, foreach and fused paths.

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/results]
    python benchmarks/bench_cpu.py --kernels all          # each SIMD kernel, like for like
    python benchmarks/bench_cpu.py --kernels avx2 --dtypes bfloat16,float16 --cases "4 x 4M tensors"

Cases: BERT-base's parameter list (built from its shapes, ~110 M params), 1000 small tensors,
4 tensors of 4 M elements and one 64 M-element tensor, in float32, bfloat16 and float16. For
each: median (and min, max) ms per step, GB/s at the bytes a step must move (read param, grad,
sum; write param, sum), the share of a streaming-bandwidth probe measured in the same run,
speedup over each PyTorch path, and bytes allocated by one step.

--kernels runs each named kernel of ours (base, avx2, avx512; `all` = those compiled in) in a
child process with FUSED_ADAGRAD_CPU_KERNEL set and torch forced to the matching capability
(ATEN_CPU_CAPABILITY=default/avx2/avx512), so both sides use the same instruction set; a kernel
this CPU cannot run is reported as skipped. Each table row says which kernel and which torch
capability ran.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad
from model_shapes import bert_base_shapes, small_shapes
from results_io import cpu_model, write_results


CASES = {
    "BERT-base": bert_base_shapes,
    "1000 small tensors": small_shapes,
    "4 x 4M tensors": lambda: [(4 * 1024 * 1024,)] * 4,
    "one 64M tensor": lambda: [(64 * 1024 * 1024,)],
}
# Our kernel names and the ATen capability that uses the same instruction set.
TORCH_CAPABILITY_OF = {"base": "default", "avx2": "avx2", "avx512": "avx512"}

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


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(fn):
    """The resident set's peak during fn() above its size before, in bytes (Linux: VmHWM, reset
    through /proc/self/clear_refs after malloc_trim, so that freed memory is not reused unseen).
    Counts every allocation: torch's, the library's own buffers, anything malloc hands out."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


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
        results[name] = {"ms": median * 1e3, "min_ms": min(times[name]) * 1e3,
                         "max_ms": max(times[name]) * 1e3, "GB/s": bytes_per_step / median / 1e9,
                         "alloc_bytes": allocated_bytes(opt)}
    optimizers.clear()
    gc.collect()
    return numel, results, probe.bytes / statistics.median(probe_times) / 1e9


def measure(dtypes, cases, iters):
    """Every case in this process: (machine line, rows of raw results)."""
    info = fused_adagrad.build_info()
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}, fused-adagrad {info['version']}")
    kernel, capability = info["cpu_kernel"], torch.backends.cpu.get_cpu_capability()
    probe = StreamingProbe()
    print(f"{machine}; our kernel {kernel}, torch capability {capability}", flush=True)
    raw = []
    for dtype in dtypes:
        for case in cases:
            shapes = CASES[case]()
            numel, res, probe_gbps = run_case(shapes, dtype, iters, probe)
            best_torch = min(res[k]["ms"] for k in res if k != "fused-adagrad")
            raw.append({"case": case, "dtype": str(dtype), "numel": numel, "tensors": len(shapes),
                        "kernel": kernel, "torch_capability": capability,
                        "probe_GBps": probe_gbps, "results": res,
                        "ours_vs_best_torch": best_torch / res["fused-adagrad"]["ms"]})
            print(f"{case}, {dtype}: probe {probe_gbps:.1f} GB/s, " +
                  ", ".join(f"{k} {r['ms']:.2f} ms" for k, r in res.items()), flush=True)
    return machine, raw


def measure_kernel(kernel, argv):
    """This script in a child process with our kernel and torch's capability forced: its raw
    rows, or None when the child fails (a kernel this CPU cannot run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "raw.json")
        env = dict(os.environ, FUSED_ADAGRAD_CPU_KERNEL=kernel,
                   ATEN_CPU_CAPABILITY=TORCH_CAPABILITY_OF[kernel])
        run = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--raw-out", out],
                             env=env, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            print(f"kernel {kernel}: skipped ({run.stderr.strip().splitlines()[-1:]})")
            return None
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--kernels", default="",
                        help="comma list of base, avx2, avx512, or all: each in a child process, "
                             "torch at the matching capability (default: this process as it is)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    parser.add_argument("--iters", type=int, default=None, help="timed turns (default 15, quick 3)")
    parser.add_argument("--raw-out", help=argparse.SUPPRESS)  # child mode: raw rows to this file
    args = parser.parse_args()
    iters = args.iters or (3 if args.quick else 15)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {list(CASES)}")

    if args.raw_out:
        machine, raw = measure(dtypes, cases, iters)
        with open(args.raw_out, "w") as f:
            json.dump({"machine": machine, "raw": raw}, f)
        return
    if args.kernels:
        names = args.kernels.split(",")
        if names == ["all"]:
            names = fused_adagrad.build_info()["cpu_kernels"]
        child_argv = ["--dtypes", args.dtypes, "--cases", args.cases, "--iters", str(iters)]
        machine, raw = None, []
        for kernel in names:
            got = measure_kernel(kernel, child_argv)
            if got is not None:
                machine = got["machine"]
                raw += got["raw"]
        if machine is None:
            raise SystemExit("no kernel ran")
    else:
        machine, raw = measure(dtypes, cases, iters)

    rows = []
    for entry in raw:
        ours_ms = entry["results"]["fused-adagrad"]["ms"]
        for name, r in entry["results"].items():
            rows.append(
                f"| {entry['case']} | {entry['dtype'].removeprefix('torch.')} | {entry['kernel']} / "
                f"{entry['torch_capability']} | {name} | {r['ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
                f"{r['GB/s']:.1f} | {100 * r['GB/s'] / entry['probe_GBps']:.0f} % | "
                f"{r['ms'] / ours_ms:.2f}x | {r['alloc_bytes'] / 2**20:.1f} MiB |")
    probes = [entry["probe_GBps"] for entry in raw]

    table = "\n".join(
        ["| case | dtype | our kernel / torch capability | path | ms/step median (min-max) | GB/s "
         "| of probe | fused-adagrad speedup | allocated per step |",
         "|---|---|---|---|---:|---:|---:|---:|---:|"] + rows)
    stamp = datetime.date.today().isoformat()
    command = " ".join(["python benchmarks/bench_cpu.py", *sys.argv[1:]])
    header = (f"- Machine: {machine}\n"
              f"- Streaming probe (in-place add, 64 M float32, timed in turns with each case's steps): "
              f"{min(probes):.1f} to {max(probes):.1f} GB/s\n"
              f"- Date: {stamp}\n- Command: {command}\n")
    print("\n" + header + "\n" + table)
    suffix = "-kernels" if args.kernels else ""
    write_results(args.out, f"cpu{suffix}-{stamp}", header + "\n" + table,
                  {"machine": machine, "date": stamp, "command": command, "cases": raw})


if __name__ == "__main__":
    main()
