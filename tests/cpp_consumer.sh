#!/usr/bin/env bash
# Usage: tests/cpp_consumer.sh BUILD_DIR  (a configured and built CMake build of this repository)
# Installs BUILD_DIR into a temporary prefix, then configures, builds and runs two projects outside
# the tree against it with find_package(FusedAdagrad CONFIG REQUIRED): examples/cpp (the complete
# C++ consumer project) and tests/cpp/consumer (the op registrations survive --as-needed).
set -euo pipefail
BUILD="$(cd "${1:?usage: tests/cpp_consumer.sh BUILD_DIR}" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

cache() { sed -n "s/^$1:[A-Z]*=//p" "$BUILD/CMakeCache.txt"; }
TORCH_PREFIX="$(cd "$(cache Torch_DIR)/.." && pwd)"  # Torch_DIR is <prefix>/Torch
VERSION="$(sed -n 's/^#define FUSED_ADAGRAD_VERSION "\(.*\)"$/\1/p' "$ROOT/csrc/fused_adagrad/fused_adagrad.h")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Show a step's output only when it fails.
quiet() {
  if ! "$@" >"$WORK/log" 2>&1; then
    cat "$WORK/log" >&2
    echo "FAILED: $*" >&2
    exit 1
  fi
}

PREFIX="$WORK/prefix"
quiet cmake --install "$BUILD" --prefix "$PREFIX"
for f in include/fused_adagrad/fused_adagrad.h lib/cmake/FusedAdagrad/FusedAdagradConfig.cmake \
         lib/cmake/FusedAdagrad/FusedAdagradConfigVersion.cmake; do
  [ -f "$PREFIX/$f" ] || { echo "FAILED: $f not installed" >&2; exit 1; }
done

build() {  # source dir relative to the repository, build dir name
  quiet cmake -S "$ROOT/$1" -B "$WORK/$2" -G "$(cache CMAKE_GENERATOR)" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$(cache CMAKE_CXX_COMPILER)" -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_PREFIX"
  quiet cmake --build "$WORK/$2"
}

echo "==> examples/cpp against the installed FusedAdagrad $VERSION"
build examples/cpp example
"$WORK/example/train" | tee "$WORK/train.out"
grep -q "^fused_adagrad $VERSION " "$WORK/train.out" || { echo "FAILED: no build info line" >&2; exit 1; }

echo "==> op registrations under --as-needed"
build tests/cpp/consumer consumer
"$WORK/consumer/op_by_name"
"$WORK/consumer/op_by_name_anchor"
echo "==> consumer OK"
