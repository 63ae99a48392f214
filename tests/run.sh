#!/usr/bin/env bash
# Runs every test: pytest (tests/python), the GoogleTest suite plus the find_package consumer
# (ctest), and C++ programs built against the pip install alone (tests/pip_consumer.sh). Sets up
# what it needs first: .venv with torch==2.13.0, the build, GoogleTest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tests/setup_env.sh"

echo "==> pytest"
# Run from the test directory so `import fused_adagrad` is the installed package, not ./python.
(cd "$ROOT/tests/python" && python -m pytest -q -p no:cacheprovider .)

if ! { [ -f /usr/lib/x86_64-linux-gnu/libgtest.a ] || [ -f /usr/lib/libgtest.a ] || \
       [ -d "$ROOT/third_party/googletest" ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing GoogleTest (libgtest-dev)"
    apt-get install -y -q libgtest-dev >/dev/null || { apt-get update -q && apt-get install -y -q libgtest-dev; }
  else
    echo "GoogleTest not found: install libgtest-dev, or put its sources in third_party/googletest" >&2
    exit 1
  fi
fi

echo "==> C++ build and ctest"
BUILD="$ROOT/build-cmake"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure

echo "==> C++ programs against the pip-installed package"
bash "$ROOT/tests/pip_consumer.sh" python
echo "==> all tests passed"
