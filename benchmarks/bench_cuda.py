"""CUDA benchmark: FusedAdagrad against torch.optim.Adagrad's for-loop, foreach and fused paths.

    python benchmarks/bench_cuda.py [--quick] [--out benchmarks/results]

Cases: BERT-base's parameter list (built from its shapes, ~110 M params), a ~1 B-parameter
decoder-style mix, 1000 small tensors and one 256 M-element tensor, in float32 and bfloat16.

Method. All paths of a case step the same params and grads (each with its own optimizer state)
and are timed in turns with the bandwidth probe (path 1, ..., path n, probe; repeat), so a clock
or bandwidth drift hits all alike. Before every timed call the L2 cache is flushed (a write of
twice its size, untimed), so small cases (1000 small tensors: 2.1 M elements, which would fit
in an H100's 50 MB L2) are measured from memory like the large ones. Each call is timed by CUDA
events: the device timeline, including any time the device waits for the host to launch work.
Reported per path: min, median and max ms; GB/s at the bytes a step must move (read param,
grad, sum; write param, sum: 20 B/element in float32, 10 in bfloat16) at the median, and that
as a share of the device-to-device copy bandwidth probed in the same turns; speedups; extra
memory (a step's peak allocation beyond what was allocated before it; for the CUDA graph, the
memory its private pool keeps); and the lr path (a float lr, or a tensor lr on the device, which
a captured graph needs). Writes a markdown table and JSON to <out>/cuda-<device>-<date>.md/.json.
"""
import argparse
import datetime
import gc
import os
import re
import statistics
import sys
import time

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad
from model_shapes import bert_base_shapes, small_shapes
from results_io import write_results


def one_billion_shapes():
    """A decoder-only transformer: hidden 2048, 20 layers, 32 k vocabulary: ~1.07 B params."""
    h, layers, vocab = 2048, 20, 32000
    shapes = [(vocab, h)]
    for _ in range(layers):
        shapes += [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,)]  # LayerNorm, qkv, output
        shapes += [(h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]  # LayerNorm, MLP
    shapes += [(h,), (h,)]  # final LayerNorm (the output layer shares the embedding)
    return shapes


CASES = {
    "BERT-base": bert_base_shapes,
    "~1B mix": one_billion_shapes,
    "1000 small tensors": small_shapes,
    "one 256M tensor": lambda: [(256 * 1024 * 1024,)],
}
LARGE_CASES = ("BERT-base", "~1B mix", "one 256M tensor")

PATHS = {
    "torch for-loop": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=False),
    "torch foreach": lambda ps: torch.optim.Adagrad(ps, lr=0.01, foreach=True),
    "torch fused": lambda ps: torch.optim.Adagrad(ps, lr=0.01, fused=True),
    "fused-adagrad": lambda ps: FusedAdagrad(ps, lr=0.01),
}
OURS = "fused-adagrad"
GRAPH = "fused-adagrad, CUDA graph replay"


class Timer:
    """CUDA-event timing of single calls, each after an untimed flush of the L2 cache."""

    def __init__(self):
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20)
        self.flush_buffer = torch.empty(2 * max(l2_bytes, 2**20), dtype=torch.uint8, device="cuda")

    def start(self, fn):
        """Runs fn once between two events (after a flush); returns the pair, to be read after
        a synchronization."""
        self.flush_buffer.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    def host_ms(self, fn):
        """Milliseconds of one call (after a flush) on the host's clock, the device synchronized
        before and after: launches and synchronizations inside fn count."""
        self.flush_buffer.zero_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3


class CopyProbe:
    """Device-to-device copy of a 1 GiB float32 buffer; bandwidth counts bytes read + written."""

    def __init__(self, elements=256 * 1024 * 1024):
        self.src = torch.rand(elements, device="cuda")
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * elements * 4

    def copy(self):
        self.dst.copy_(self.src)


def make_params(shapes, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, dtype=dtype, device="cuda", generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype, device="cuda", generator=gen)
    return params


def extra_memory(step):
    """Peak bytes step() allocates beyond what is allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def captured_step(params):
    """Our step with a device lr, captured once in a CUDA graph: (graph, bytes its pool keeps)."""
    opt = FusedAdagrad(params, lr=torch.tensor(0.01, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    graph.optimizer = opt  # keeps the captured state alive with the graph
    return graph, torch.cuda.memory_allocated() - before


def release():
    gc.collect()
    torch.cuda.empty_cache()


def run_case(shapes, dtype, iters, warmup, timer, probe):
    """(numel, bytes per step, results by path, probe GB/s of this case's turns)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    bytes_per_step = numel * dtype.itemsize * 5  # read p, g, sum; write p, sum
    params = make_params(shapes, dtype)
    results, steppers = {}, {}
    for name, make in PATHS.items():
        try:
            opt = make(params)
            opt.step()
        except RuntimeError as e:  # e.g. a torch without a fused CUDA Adagrad for this dtype
            results[name] = {"error": str(e).splitlines()[0]}
            continue
        steppers[name] = (opt.step, extra_memory(opt.step), "float")
    graph = None
    try:
        graph, graph_bytes = captured_step(params)
        steppers[GRAPH] = (graph.replay, graph_bytes, "tensor (device)")
    except RuntimeError as e:  # reported in the table; the other paths are still measured
        results[GRAPH] = {"error": str(e).splitlines()[0]}
        torch.cuda.synchronize()
    times = {name: [] for name in steppers}
    probe_times = []
    for turn in range(warmup + iters):
        pairs = {name: timer.start(fn) for name, (fn, _, _) in steppers.items()}
        probe_pair = timer.start(probe.copy)
        torch.cuda.synchronize()
        if turn >= warmup:
            for name, (start, end) in pairs.items():
                times[name].append(start.elapsed_time(end))
            probe_times.append(probe_pair[0].elapsed_time(probe_pair[1]))
    for name, (_, extra_bytes, lr) in steppers.items():
        ms = statistics.median(times[name])
        results[name] = {"ms": ms, "min_ms": min(times[name]), "max_ms": max(times[name]),
                         "GB/s": bytes_per_step / (ms * 1e-3) / 1e9, "extra_bytes": extra_bytes,
                         "lr": lr}
    steppers.clear()
    del graph, params
    release()
    probe_gbps = probe.bytes / (statistics.median(probe_times) * 1e-3) / 1e9
    return numel, bytes_per_step, results, probe_gbps


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def targets(raw):
    """The issue's targets, each with the measured value and whether it is met."""
    lines = []
    for case in raw:
        r, probe = case["results"], case["copy_GBps"]
        ours = r[OURS]["ms"]

        def speedup(path):
            return r[path]["ms"] / ours if "ms" in r.get(path, {}) else None

        label = f"{case['case']} {case['dtype']}"
        checks = []
        if case["case"] in LARGE_CASES and case["dtype"] == "float32":
            share = r[OURS]["GB/s"] / probe
            checks.append((">= 90 % of copy bandwidth", f"{100 * share:.0f} %", share >= 0.9))
        if case["case"] in LARGE_CASES:
            checks.append((">= 2.2x foreach", speedup("torch foreach"), 2.2))
            checks.append((">= 1.0x torch fused", speedup("torch fused"), 1.0))
        if case["case"] == "1000 small tensors":
            checks.append((">= 5x foreach", speedup("torch foreach"), 5.0))
        for what, value, goal in checks:
            if isinstance(goal, bool):
                lines.append(f"- {label}: {what}: {value} ({'met' if goal else 'NOT met'})")
            elif value is None:
                lines.append(f"- {label}: {what}: not measured (path unavailable)")
            else:
                verdict = "met" if value >= goal else "NOT met"
                lines.append(f"- {label}: {what}: {value:.2f}x ({verdict})")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: no CUDA device (torch.cuda.is_available() is False); "
                 "run it on a machine with an NVIDIA GPU and a CUDA build of torch")
    info = fused_adagrad.build_info()
    if not info["cuda"]:
        sys.exit("bench_cuda: fused_adagrad was built without CUDA (build_info()['cuda'] is "
                 "False); reinstall it with a CUDA torch and nvcc present")
    iters, warmup = (5, 2) if args.quick else (20, 5)

    props = torch.cuda.get_device_properties(0)
    machine = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}, fused-adagrad {info['version']}")
    print(machine)
    timer, probe = Timer(), CopyProbe()

    rows, raw = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for case, shapes_fn in CASES.items():
            shapes = shapes_fn()
            numel, bytes_per_step, res, probe_gbps = run_case(shapes, dtype, iters, warmup, timer,
                                                              probe)
            ours = res[OURS]["ms"]
            for name, r in res.items():
                if "error" in r:
                    rows.append(f"| {case} | {str(dtype)[6:]} | {name} | | n/a: {r['error']} "
                                "| | | | |")
                else:
                    rows.append(
                        f"| {case} | {str(dtype)[6:]} | {name} | {r['lr']} | "
                        f"{r['ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f}) | {r['GB/s']:.0f} | "
                        f"{100 * r['GB/s'] / probe_gbps:.0f} % | {r['ms'] / ours:.2f}x | "
                        f"{r['extra_bytes'] / 2**20:.1f} MiB |")
                print(rows[-1], flush=True)
            raw.append({"case": case, "dtype": str(dtype)[6:], "numel": numel,
                        "tensors": len(shapes), "bytes_per_step": bytes_per_step,
                        "copy_GBps": probe_gbps, "results": res})

    table = "\n".join(
        ["| case | dtype | path | lr | ms/step median (min-max) | GB/s | of copy bandwidth "
         "| fused-adagrad speedup | extra memory |",
         "|---|---|---|---|---:|---:|---:|---:|---:|"] + rows)
    goals = targets(raw)
    stamp = datetime.date.today().isoformat()
    probes = [case["copy_GBps"] for case in raw]
    header = (f"- Device: {machine}\n"
              f"- Device-to-device copy bandwidth (1 GiB float32, read + write, timed in turns "
              f"with each case's steps): {min(probes):.0f} to {max(probes):.0f} GB/s\n"
              f"- Date: {stamp}\n"
              f"- Command: python benchmarks/bench_cuda.py{' --quick' if args.quick else ''}\n"
              f"- Bytes per step: 5 x element size per element (read param, grad, sum; write "
              f"param, sum). Times: {iters} turns after {warmup} warm-up turns, CUDA events, L2 "
              f"flushed before each timed call.\n")
    text = header + "\n" + table + "\n\nTargets:\n" + "\n".join(goals)
    print("\n" + text)
    write_results(args.out, f"cuda-{device_slug(props.name)}-{stamp}", text,
                  {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "fused_adagrad": info["version"], "date": stamp, "iters": iters,
                   "warmup": warmup, "cases": raw, "targets": goals})


if __name__ == "__main__":
    main()
