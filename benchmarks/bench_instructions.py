"""Instructions per element of the CPU step, counted by valgrind's callgrind: torch's fused=True
kernel and ours, each of our kernels against torch forced to the matching capability.

Times on the shared 2-core dev VMs drift, and two hosts can rank two compute-bound kernels
differently; an instruction count is the same on every run and every machine that runs that
kernel, so it tells what a kernel costs wherever it runs (it is not a time: two kernels with the
same count can run at different speeds). Each count is one child Python under callgrind, with
collection on only inside the kernel's entry point (torch: its fused_adagrad_kernel, ours:
update_range of the kernel), one thread, N elements, STEPS steps: count / (N * STEPS).

Usage: python benchmarks/bench_instructions.py [--kernels base,avx2] [--dtypes float16,bfloat16,float32]
Needs valgrind (apt-get install valgrind), which runs base and avx2 but not AVX-512 code; one to
two minutes per count, most of it importing torch.
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

from bench_cpu import TORCH_CAPABILITY_OF as CAPABILITY
from results_io import cpu_model, write_results

# Functions inside which callgrind counts (inclusive of what they call).
# Patterns without a leading *: one function each, as a nested match would toggle collection off.
# (torch's adagrad_math, its element loop, is inlined in its AVX2 and AVX-512 builds.)
ENTRY = {"torch": "at::native::(anonymous namespace)::fused_adagrad_kernel*",
         "ours": "fused_adagrad::cpu::{kernel}::update_range*"}

CHILD = """
import sys, torch
path, dtype, n, steps = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
p = (0.5 + torch.rand(n)).to(dtype)
p.grad = (0.01 * (torch.rand(n) + 0.1)).to(dtype)
if path == "torch":
    opt = torch.optim.Adagrad([p], lr=1e-3, fused=True)
else:
    import fused_adagrad
    assert fused_adagrad.build_info()["cpu_kernel"] == sys.argv[5]
    opt = fused_adagrad.FusedAdagrad([p], lr=1e-3)
for _ in range(steps):
    opt.step()
"""


def count(path, kernel, dtype, n, steps):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": CAPABILITY[kernel],
           "FUSED_ADAGRAD_CPU_KERNEL": kernel, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=" + ENTRY[path].format(kernel=kernel),
             "--callgrind-out-file=" + out,
             sys.executable, "-c", CHILD, path, dtype, str(n), str(steps), kernel],
            env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{path} {kernel} {dtype}: {run.stderr[-2000:]}")
        collected = re.search(r"Collected : (\d+)", run.stderr)
        if not collected or int(collected.group(1)) == 0:
            raise RuntimeError(f"{path} {kernel} {dtype}: nothing collected in {ENTRY[path]}")
        return int(collected.group(1)) / (n * steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="base")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--elements", type=int, default=1 << 18)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    import torch
    import fused_adagrad

    rows, data = [], []
    for kernel in args.kernels.split(","):
        for dtype in args.dtypes.split(","):
            theirs = count("torch", kernel, dtype, args.elements, args.steps)
            ours = count("ours", kernel, dtype, args.elements, args.steps)
            print(f"{kernel} / {CAPABILITY[kernel].upper()} {dtype}: torch fused {theirs:.1f}, "
                  f"fused-adagrad {ours:.1f} instructions per element", flush=True)
            rows.append(f"| {kernel} / {CAPABILITY[kernel].upper()} | {dtype} | {theirs:.1f} | "
                        f"{ours:.1f} | {theirs / ours:.2f}x |")
            data.append({"kernel": kernel, "dtype": dtype, "torch_fused": theirs, "ours": ours})
    today = datetime.date.today().isoformat()
    md = "\n".join([
        f"- Machine: {cpu_model()}, torch {torch.__version__}, "
        f"fused-adagrad {fused_adagrad.__version__}, valgrind callgrind, one thread",
        f"- Date: {today}",
        "- Command: python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        f"- {args.elements} elements, {args.steps} steps, default options (eps 1e-10, no weight "
        "decay); counted inside torch's fused_adagrad_kernel and our update_range",
        "",
        "| our kernel / torch | dtype | torch fused=True | fused-adagrad | torch / ours |",
        "|---|---|---:|---:|---:|",
        *rows,
    ])
    print(md)
    write_results(args.out, f"instructions-cpu-{today}", md, {"date": today, "rows": data})


if __name__ == "__main__":
    main()
