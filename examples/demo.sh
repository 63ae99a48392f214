#!/usr/bin/env bash
# The demo: sets up .venv (torch==2.13.0) and the build if needed, installs matplotlib for the plot
# if missing, then trains a small model with torch.optim.Adagrad (default and fused=True) and
# FusedAdagrad side by side and prints the parity verdict and the speedup. Arguments go to demo.py
# (--out PATH for the PNG; default build/demo.png). The .venv it leaves also runs the two
# learning examples, examples/d2l_adagrad.py and examples/adagrad_vs_rmsprop.py (README:
# Learning Adagrad).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tests/setup_env.sh"
if ! python -c "import matplotlib" 2>/dev/null; then
  echo "==> installing matplotlib (for the demo's plot only)"
  python -m pip install -q matplotlib
fi
cd "$ROOT/examples" && python demo.py "$@"
