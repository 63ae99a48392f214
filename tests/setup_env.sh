# Sourced by tests/run.sh and examples/demo.sh: makes ./.venv with the pinned torch and the
# build tools, then builds and installs this package into it. Idempotent; re-running only
# rebuilds what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSED_ADAGRAD_VENV:-$ROOT/.venv}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# Install when a tool is missing or the venv holds another torch than the pin asks for.
if ! python -c "import torch, pybind11, numpy, expecttest, pytest, hypothesis, tqdm, packaging
pin = '${TORCH_PIN#torch==}'
assert pin == '$TORCH_PIN' or torch.__version__.split('+')[0] == pin" 2>/dev/null; then
  echo "==> installing $TORCH_PIN and the build/test tools"
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_PIN" pybind11 numpy expecttest pytest hypothesis tqdm packaging ninja setuptools wheel
fi

echo "==> building fused-adagrad against $(python -c 'import torch; print(torch.__version__)')"
(cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install -q --no-build-isolation .)
