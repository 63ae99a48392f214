"""CUDA benchmark: FusedAdagrad against torch.optim.Adagrad's for-loop, foreach and fused paths.

    python benchmarks/bench_cuda.py [--quick] [--out benchmarks/results]

Cases: BERT-base's parameter list (built from its shapes, ~110 M params), a ~1 B-parameter
decoder-style mix, 1000 small tensors and one 256 M-element tensor, in float32 and bfloat16. For
each path: median ms per step from CUDA events, GB/s at the bytes a step must move (read param,
grad, sum; write param, sum: 20 B/element in float32, 10 in bfloat16), that as a share of the
device-to-device copy bandwidth measured in the same run, speedups, and the extra memory one step
allocates; for ours also the time to replay the step captured in a CUDA graph. Writes a markdown
table and JSON to <out>/cuda-<device>-<date>.md/.json.
"""
import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys

import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad
from model_shapes import bert_base_shapes, small_shapes


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


def median_ms(fn, iters, warmup):
    """Median of per-call times between CUDA events: the device timeline, including any time the
    device waits for the host to launch the work."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth(iters, elements=256 * 1024 * 1024):
    """Device-to-device copy of a 1 GiB float32 buffer: bytes read + written per second, GB/s."""
    src = torch.rand(elements, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters, warmup=3)
    del src, dst
    return 2 * elements * 4 / (ms * 1e-3) / 1e9


def make_params(shapes, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, dtype=dtype, device="cuda", generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype, device="cuda", generator=gen)
    return params


def extra_memory(opt):
    """Peak bytes a step allocates beyond what is allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def graph_replay_ms(shapes, dtype, iters, warmup):
    """Our step with a device lr, captured once in a CUDA graph, then replayed."""
    params = make_params(shapes, dtype)
    opt = FusedAdagrad(params, lr=torch.tensor(0.01, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    ms = median_ms(graph.replay, iters, warmup)
    del graph, opt, params
    return ms


def release():
    gc.collect()
    torch.cuda.empty_cache()


def run_case(shapes, dtype, iters, warmup):
    numel = sum(torch.Size(s).numel() for s in shapes)
    bytes_per_step = numel * dtype.itemsize * 5  # read p, g, sum; write p, sum
    results = {}
    for name, make in PATHS.items():
        release()
        params = make_params(shapes, dtype)
        try:
            opt = make(params)
            opt.step()
        except RuntimeError as e:  # e.g. a torch without a fused CUDA Adagrad for this dtype
            results[name] = {"error": str(e).splitlines()[0]}
            del params
            continue
        ms = median_ms(opt.step, iters, warmup)
        results[name] = {"ms": ms, "GB/s": bytes_per_step / (ms * 1e-3) / 1e9,
                         "extra_bytes": extra_memory(opt)}
        del opt, params
    release()
    ms = graph_replay_ms(shapes, dtype, iters, warmup)
    results[GRAPH] = {"ms": ms, "GB/s": bytes_per_step / (ms * 1e-3) / 1e9, "extra_bytes": 0}
    release()
    return numel, bytes_per_step, results


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def targets(raw, probe):
    """The issue's targets, each with the measured value and whether it is met."""
    lines = []
    for case in raw:
        r = case["results"]
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
    probe = copy_bandwidth(iters)
    print(f"{machine}\ndevice-to-device copy: {probe:.0f} GB/s")

    rows, raw = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for case, shapes_fn in CASES.items():
            shapes = shapes_fn()
            numel, bytes_per_step, res = run_case(shapes, dtype, iters, warmup)
            ours = res[OURS]["ms"]
            for name, r in res.items():
                if "error" in r:
                    rows.append(f"| {case} | {str(dtype)[6:]} | {name} | n/a: {r['error']} "
                                "| | | | |")
                else:
                    rows.append(
                        f"| {case} | {str(dtype)[6:]} | {name} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
                        f"{100 * r['GB/s'] / probe:.0f} % | {r['ms'] / ours:.2f}x | "
                        f"{r['extra_bytes'] / 2**20:.1f} MiB |")
                print(rows[-1])
            raw.append({"case": case, "dtype": str(dtype)[6:], "numel": numel,
                        "tensors": len(shapes), "bytes_per_step": bytes_per_step, "results": res})

    table = "\n".join(
        ["| case | dtype | path | ms/step (median) | GB/s | of copy bandwidth "
         "| fused-adagrad speedup | extra memory per step |",
         "|---|---|---|---:|---:|---:|---:|---:|"] + rows)
    goals = targets(raw, probe)
    stamp = datetime.date.today().isoformat()
    header = (f"Device: {machine}\n"
              f"Device-to-device copy bandwidth (1 GiB float32, read + write): {probe:.0f} GB/s\n"
              f"Date: {stamp}\n"
              f"Command: python benchmarks/bench_cuda.py{' --quick' if args.quick else ''}\n"
              f"Bytes per step: 5 x element size per element (read param, grad, sum; write "
              f"param, sum). Times: median of {iters} steps after {warmup} warm-up steps, CUDA "
              f"events.\n")
    text = header + "\n" + table + "\n\nTargets:\n" + "\n".join(goals) + "\n"
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cuda-{device_slug(props.name)}-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "fused_adagrad": info["version"], "date": stamp, "copy_GBps": probe,
                   "iters": iters, "warmup": warmup, "cases": raw, "targets": goals}, f, indent=1)
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
