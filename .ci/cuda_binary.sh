#!/usr/bin/env bash
# Usage: .ci/cuda_binary.sh PYTHON [REPORT]
# Checks the GPU code inside a CUDA build of fused-adagrad (pip-installed for PYTHON, built with
# FUSED_ADAGRAD_CUDA=1), on a machine with or without a GPU:
#  - the fatbin of libfused_adagrad.so holds machine code for every architecture that
#    build_info()["cuda_archs"] names, and PTX for each one marked +PTX, which the driver
#    compiles for newer GPUs (cuobjdump --list-elf, --list-ptx);
#  - the hot kernels (the element-wise dense and sparse steps) use no stack and no local memory,
#    where register spills would go: cuobjdump's resource usage per kernel and architecture,
#    written as a table to REPORT (default build/cuda-resources.md; benchmarks/results/ keeps a
#    dated copy). A few row-wise kernel images keep a small stack frame (ptxas reports 4-20
#    bytes of spills there, benchmarks/results/ptxas-*.md): reported, not refused.
# cuobjdump: from PATH or the CUDA toolkit, else pip's nvidia-cuda-cuobjdump into build/tools.
set -euo pipefail
PYTHON="${1:?usage: .ci/cuda_binary.sh PYTHON [REPORT]}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REPORT="${2:-$ROOT/build/cuda-resources.md}"
fail() { echo "cuda_binary: FAILED: $*" >&2; exit 1; }

CUOBJDUMP="$(command -v cuobjdump || true)"
for candidate in "${CUDA_HOME:-/nonexistent}/bin/cuobjdump" /usr/local/cuda/bin/cuobjdump \
                 "$ROOT"/build/tools/nvidia/cu*/bin/cuobjdump; do
  if [ -z "$CUOBJDUMP" ] && [ -x "$candidate" ]; then CUOBJDUMP="$candidate"; fi
done
if [ -z "$CUOBJDUMP" ]; then
  echo "cuda_binary: installing cuobjdump (nvidia-cuda-cuobjdump) into build/tools"
  "$PYTHON" -m pip install -q --target "$ROOT/build/tools" nvidia-cuda-cuobjdump
  CUOBJDUMP="$(ls "$ROOT"/build/tools/nvidia/cu*/bin/cuobjdump | head -n 1)"
fi

read -r LIB ARCHS TORCH < <("$PYTHON" -c '
import os, fused_adagrad as f, torch
info = f.build_info()
assert info["cuda"], "this fused_adagrad was built without CUDA"
print(os.path.join(os.path.dirname(f.__file__), "lib", "libfused_adagrad.so"),
      ";".join(info["cuda_archs"]), torch.__version__)')
echo "cuda_binary: $LIB (archs $ARCHS, torch $TORCH, $("$CUOBJDUMP" --version | tail -n 1))"

elf="$("$CUOBJDUMP" --list-elf "$LIB")"
ptx="$("$CUOBJDUMP" --list-ptx "$LIB")"
for arch in ${ARCHS//;/ }; do
  sm="${arch%+PTX}"; sm="${sm/./}"
  grep -q "\.sm_${sm}\.cubin" <<<"$elf" || fail "no sm_${sm} machine code in $LIB"
  if [[ "$arch" == *+PTX ]]; then
    grep -q "\.sm_${sm}\.ptx" <<<"$ptx" || fail "no compute_${sm} PTX in $LIB"
  fi
done
echo "cuda_binary: machine code: $(grep -o 'sm_[0-9]*[a-z]*\.cubin' <<<"$elf" | sort -u | tr '\n' ' ')"
echo "cuda_binary: PTX: $(grep -o 'sm_[0-9]*[a-z]*\.ptx' <<<"$ptx" | sort -u | tr '\n' ' ')"

# "arch = sm_90" opens each cubin's section; "Function <mangled>:" then its usage line.
mkdir -p "$(dirname "$REPORT")"
"$CUOBJDUMP" --dump-resource-usage "$LIB" | "$PYTHON" -c '
import re, subprocess, sys
arch, rows, name = None, [], None
for line in sys.stdin:
    if m := re.match(r"\s*arch = (sm_\w+)", line):
        arch = m.group(1)
    elif m := re.match(r"\s*Function (\S+):", line):
        name = m.group(1)
    elif name and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
        rows.append((arch, name, *map(int, m.groups())))
        name = None
names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True,
                       text=True).stdout.splitlines()
def short(n):  # the kernel and its template arguments, without return type and parameter list
    n = re.sub(r"^void |\(anonymous namespace\)::|fused_adagrad::cuda::", "", n)
    depth, end = 0, len(n)
    for i, c in enumerate(n):
        depth += c in "<"; depth -= c in ">"
        if c == "(" and depth == 0:
            end = i; break
    return n[:end]
out = ["| arch | kernel | registers | stack B | shared B | local B |", "|---|---|---:|---:|---:|---:|"]
spills = []
for (arch, _, reg, stack, shared, local), n in sorted(zip(rows, names), key=lambda x: (x[0][0], x[1])):
    out.append(f"| {arch} | `{short(n)}` | {reg} | {stack} | {shared} | {local} |")
    if (stack or local) and re.match(r"(sparse_)?adagrad_kernel<", short(n)):
        spills.append(f"{arch} {short(n)}: stack {stack} B, local {local} B")
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"cuda_binary: {len(rows)} kernel images, resource table in {sys.argv[1]}")
if not rows:
    sys.exit("cuda_binary: FAILED: no kernels found in the resource usage dump")
if spills:
    sys.exit("cuda_binary: FAILED: hot kernels use local memory or a stack (spills):\n  " + "\n  ".join(spills))
' "$REPORT"
echo "cuda_binary: OK"
