"""Optimizer step time under FSDP2 (fully_shard): FusedAdagrad against torch.optim.Adagrad on
DTensor params, 2 gloo ranks on 127.0.0.1 (CPU, one thread per rank).

    python benchmarks/bench_fsdp.py [--layers 48 --width 256] [--iters 30] [--out DIR]

The model is a stack of Linear layers, each its own fully_shard unit (weight and bias: 2 DTensor
params per layer). After one backward the grads stay, and `opt.step()` alone is timed, median
(min-max) over iterations, on rank 0. Each optimizer is also timed on plain tensors of the
local shards' shapes: what the same arithmetic costs without DTensor, so the difference is
the per-step overhead of stepping DTensors (pytorch issue 134191: the optimizer took a third
of an FSDP2 step). Paths: torch for-loop (foreach=False), torch foreach (the default; its
foreach ops dispatch through DTensor), FusedAdagrad (one op call on the local shards).
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_adagrad
from fused_adagrad import FusedAdagrad
from results_io import write_results

WORLD = 2
PATHS = {
    "torch for-loop": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=False),
    "torch foreach": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=True),
    "fused-adagrad": lambda ps: FusedAdagrad(ps, lr=0.01),
}


def make_model(layers, width):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def step_ms(opt, iters, warmup=3):
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3}


def rank_main(rank, port, layers, width, iters, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    x = torch.randn(16, width)
    results = {}
    for name, make in PATHS.items():
        model = make_model(layers, width)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(x).square().mean().backward()
        opt = make(model.parameters())
        sharded = step_ms(opt, iters)
        # The same arithmetic on plain tensors shaped like this rank's shards.
        local = [torch.nn.Parameter(p.to_local().detach().clone()) for p in model.parameters()]
        for p, q in zip(local, model.parameters()):
            p.grad = q.grad.to_local().clone()
        plain = step_ms(make(local), iters)
        results[name] = {"sharded": sharded, "plain": plain}
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # no finalization, where gloo's threads may abort (see test_distributed.py)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "rank0.json")
        rank_args = (free_port(), args.layers, args.width, args.iters, raw_path)
        mp.start_processes(rank_main, args=rank_args, nprocs=WORLD, start_method="spawn")
        with open(raw_path) as f:
            results = json.load(f)

    params = 2 * args.layers
    numel = args.layers * (args.width * args.width + args.width)
    info = fused_adagrad.build_info()
    machine = (f"{os.cpu_count()} cores, {WORLD} gloo ranks with 1 thread each, torch "
               f"{torch.__version__}, fused-adagrad {info['version']} "
               f"({info['cpu_kernel']} kernel)")
    ours = results["fused-adagrad"]["sharded"]["ms"]
    rows = []
    for name, r in results.items():
        s, p = r["sharded"], r["plain"]
        rows.append(f"| {name} | {s['ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f}) | "
                    f"{p['ms']:.2f} | {s['ms'] - p['ms']:.2f} | {s['ms'] / ours:.2f}x |")
    stamp = datetime.date.today().isoformat()
    command = " ".join(["python benchmarks/bench_fsdp.py", *sys.argv[1:]])
    header = (f"- Machine: {machine}\n- Model: {args.layers} Linear({args.width}, {args.width}) "
              f"layers, each fully_shard-ed: {params} DTensor params, {numel / 1e6:.1f} M elements "
              f"({numel / WORLD / 1e6:.1f} M per rank), float32\n"
              f"- Timed: opt.step() on rank 0, {args.iters} iterations\n- Date: {stamp}\n"
              f"- Command: {command}\n")
    table = "\n".join(["| path | step on DTensors, ms median (min-max) | same step on plain local "
                       "tensors, ms | DTensor overhead, ms | vs fused-adagrad |",
                       "|---|---:|---:|---:|---:|"] + rows)
    print("\n" + header + "\n" + table)
    write_results(args.out, f"fsdp-cpu-{stamp}", header + "\n" + table,
                  {"machine": machine, "date": stamp, "command": command, "layers": args.layers,
                   "width": args.width, "results": results})


if __name__ == "__main__":
    main()
