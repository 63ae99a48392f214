"""The optimizer step under torch.amp.GradScaler on the CPU: FusedAdagrad against torch's Adagrad.

    python benchmarks/bench_amp.py [--cases "BERT-base,4 x 4M tensors"] [--iters 15] [--out benchmarks/results]

Times what a mixed-precision loop runs after backward, `scaler.step(opt); scaler.update()`,
on float32 params whose grads carry GradScaler's loss scale (2^16), for:
  torch foreach      the scaler unscales every grad in its own pass, then the step;
  torch fused        torch.optim.Adagrad(fused=True): the step unscales;
  fused-adagrad      FusedAdagrad: the step unscales, in the same pass as the update;
  fused-adagrad, scaler unscales   FusedAdagrad told not to (_step_supports_amp_scaling off):
                     the scaler's unscaling pass, then our plain step.
For a step that unscales itself, GradScaler still runs a pass over every grad first to look for
infs (GradScaler._check_inf_per_device: torch's check-and-unscale kernel with a scale of 1,
which reads and writes each grad), and the step then writes the unscaled grads back (as
fused=True leaves them): 8 + 24 B/element in all, against 8 + 20 for the unscaling pass and a
plain step. So on a memory-bound CPU the last path is the fastest; the fused protocol is what
keeps a CUDA step free of host synchronization.
Before each timed step the scaled grads are restored by an untimed copy. Paths and the
streaming probe (bench_cpu.py) are timed in turns; ms/step median (min-max), GB/s at the bytes
the step itself must move (read param, grad, sum; write param, sum, grad: 24 B/element), share
of the probe, and each path's time over ours.
"""
import argparse
import datetime
import gc
import os
import statistics
import sys

import torch

import fused_adagrad
from bench_cpu import CASES, StreamingProbe, seconds
from fused_adagrad import FusedAdagrad
from results_io import write_results


def fused_adagrad_without_amp(params):
    opt = FusedAdagrad(params, lr=0.01)
    opt._step_supports_amp_scaling = False  # GradScaler then unscales in its own pass
    return opt


PATHS = {
    "torch foreach": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=True),
    "torch fused": lambda ps: torch.optim.Adagrad(ps, lr=0.01, fused=True),
    "fused-adagrad": lambda ps: FusedAdagrad(ps, lr=0.01),
    "fused-adagrad, scaler unscales": fused_adagrad_without_amp,
}


def run_case(shapes, iters, probe, warmup=2):
    numel = sum(torch.Size(s).numel() for s in shapes)
    bytes_per_step = numel * 4 * 6
    setups = {}
    for name, make in PATHS.items():
        torch.manual_seed(0)
        params = [torch.randn(s) for s in shapes]
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))  # makes the scale tensor, as scaling the loss would
        scaled = [torch.randn(s) * scaler.get_scale() for s in shapes]
        for p, g in zip(params, scaled):
            p.grad = g.clone()
        setups[name] = (params, scaled, make(params), scaler)
    times = {name: [] for name in setups}
    probe_times = []
    for turn in range(warmup + iters):
        for name, (params, scaled, opt, scaler) in setups.items():
            for p, g in zip(params, scaled):
                p.grad.copy_(g)

            def step():
                scaler.step(opt)
                scaler.update()
            t = seconds(step)
            if turn >= warmup:
                times[name].append(t)
        t = probe.time_once()
        if turn >= warmup:
            probe_times.append(t)
    # Every path stepped the same params on the same grads: they must agree.
    reference = setups["torch fused"][0]
    for name, (params, *_) in setups.items():
        assert all(torch.allclose(p, r, rtol=1e-5, atol=1e-6) for p, r in zip(params, reference)), name
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {"ms": median * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                         "GB/s": bytes_per_step / median / 1e9}
    setups.clear()
    gc.collect()
    return numel, results, probe.bytes / statistics.median(probe_times) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="BERT-base,4 x 4M tensors,1000 small tensors")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {list(CASES)}")

    info = fused_adagrad.build_info()
    machine = (f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
               f"{torch.__version__}, fused-adagrad {info['version']} ({info['cpu_kernel']} kernel)")
    print(machine, flush=True)
    probe = StreamingProbe()
    rows, raw = [], []
    for case in cases:
        numel, res, probe_gbps = run_case(CASES[case](), args.iters, probe)
        raw.append({"case": case, "numel": numel, "probe_GBps": probe_gbps, "results": res})
        ours = res["fused-adagrad"]["ms"]
        for name, r in res.items():
            rows.append(f"| {case} | {name} | {r['ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
                        f"{r['GB/s']:.1f} | {100 * r['GB/s'] / probe_gbps:.0f} % | "
                        f"{r['ms'] / ours:.2f}x |")
        print(f"{case}: probe {probe_gbps:.1f} GB/s, " +
              ", ".join(f"{k} {r['ms']:.2f} ms" for k, r in res.items()), flush=True)

    stamp = datetime.date.today().isoformat()
    command = " ".join(["python benchmarks/bench_amp.py", *sys.argv[1:]])
    probes = [entry["probe_GBps"] for entry in raw]
    header = (f"- Machine: {machine}\n- float32 params, grads scaled by GradScaler's 2^16; timed: "
              f"scaler.step(opt); scaler.update()\n"
              f"- Streaming probe (bench_cpu.py's, timed in turns): {min(probes):.1f} to "
              f"{max(probes):.1f} GB/s\n- Date: {stamp}\n- Command: {command}\n")
    table = "\n".join(["| case | path | ms/step median (min-max) | GB/s | of probe | vs fused-adagrad |",
                       "|---|---|---:|---:|---:|---:|"] + rows)
    print("\n" + header + "\n" + table)
    write_results(args.out, f"amp-cpu-{stamp}", header + "\n" + table,
                  {"machine": machine, "date": stamp, "command": command, "cases": raw})


if __name__ == "__main__":
    main()
