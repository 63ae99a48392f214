#!/usr/bin/env bash
# Usage: tests/torch_version.sh TORCH_VERSION [auto|1|0]
# Builds fused-adagrad against another torch release, in a venv of its own (.venv-torch<VERSION>),
# with FUSED_ADAGRAD_CUDA set to the second argument (default auto, what a user gets), then runs
# the core of the suite against that install: the parity, optimizer, sparse, row-wise, op and
# embedding-bag tests, and the C++ programs built against the pip package (tests/pip_consumer.sh). CI runs it
# for the oldest and the newest torch we support; tests/run.sh covers the pinned one in full.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${1:?usage: tests/torch_version.sh TORCH_VERSION [auto|1|0]}"
export FUSED_ADAGRAD_CUDA="${2:-auto}"
export FUSED_ADAGRAD_VENV="$ROOT/.venv-torch$VERSION" TORCH_PIN="torch==$VERSION"
# A machine-wide pip constraint may cap torch below the newest release; this venv asks for one.
export PIP_CONSTRAINT=/dev/null
source "$ROOT/tests/setup_env.sh"
python -c 'import fused_adagrad as f, torch; i = f.build_info()
print(f"fused-adagrad {f.__version__}: torch {torch.__version__}, CPU kernel", i["cpu_kernel"],
      "CUDA kernels", i["cuda_archs"] or "none", i["cuda_not_built_because"], i["cuda_devices"], "GPU(s)")'

echo "==> pytest (core subset) against torch $VERSION"
(cd "$ROOT/tests/python" && python -m pytest -q -p no:cacheprovider -rs \
  test_parity.py test_optimizer.py test_sparse.py test_rowwise.py test_op.py test_embedding_bags.py)
# A CUDA torch's own CMake config wants a CUDA toolkit of its CUDA major (FindCUDA, nvToolsExt).
# The C++ programs here use the CPU only, so where the machine has another major (torch 2.4.1 is
# CUDA 12.1, this machine's nvcc 13.0), that toolkit stands in, with the nvToolsExt of torch's
# own nvidia-nvtx wheel (CUDA 13 has none); without any toolkit the programs are skipped.
read -r torch_cuda toolkit_cuda nvtx < <(cd "$ROOT/tests/python" && python -c '
import os, torch_support
try:
    import nvidia.nvtx
    nvtx = os.path.dirname(nvidia.nvtx.__file__)
except ImportError:
    nvtx = "none"
print(*torch_support.cuda_majors(), nvtx)')
toolkit="${CUDA_HOME:-/usr/local/cuda}"
if [ "$torch_cuda" = none ] || [ "$torch_cuda" = "$toolkit_cuda" ]; then
  echo "==> C++ programs against the pip package, torch $VERSION"
  bash "$ROOT/tests/pip_consumer.sh" python
elif [ -x "$toolkit/bin/nvcc" ] && [ -f "$nvtx/lib/libnvToolsExt.so.1" ]; then
  echo "==> C++ programs against the pip package, torch $VERSION (its CMake config wants CUDA" \
       "$torch_cuda; CUDA $toolkit_cuda at $toolkit and nvidia-nvtx's nvToolsExt stand in)"
  CUDA_PATH="$toolkit" PIP_CONSUMER_CMAKE_ARGS="-DCUDA_nvToolsExt_LIBRARY=$nvtx/lib/libnvToolsExt.so.1 \
-DCUDAToolkit_nvToolsExt_INCLUDE_DIR=$nvtx/include" bash "$ROOT/tests/pip_consumer.sh" python
else
  echo "==> C++ programs SKIPPED: torch $VERSION's CMake config needs a CUDA $torch_cuda toolkit" \
       "(this machine has CUDA $toolkit_cuda, nvToolsExt: $nvtx)"
fi
echo "==> torch $VERSION: passed"
