#!/usr/bin/env bash
# The demo: sets up .venv (torch==2.13.0) and the build if needed, then trains a small model with
# torch.optim.Adagrad and FusedAdagrad side by side and prints the parity verdict and the speedup.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tests/setup_env.sh"
cd "$ROOT/examples" && python demo.py
