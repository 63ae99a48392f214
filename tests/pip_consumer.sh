#!/usr/bin/env bash
# Usage: tests/pip_consumer.sh [PYTHON]  (a Python with fused-adagrad pip-installed; default: python)
# The C++ package inside the pip install, used by projects outside the tree with nothing but
#   -DCMAKE_PREFIX_PATH="<fused_adagrad.cmake_prefix_path>;<torch.utils.cmake_prefix_path>"
# builds and runs examples/cpp (the complete C++ consumer project) and tests/cpp/consumer (the op
# registrations survive --as-needed), then checks that the library needs no libpython, that a
# versioned find_package works, and that the config refuses a torch of another minor version.
set -euo pipefail
PYTHON="${1:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"  # so that Python imports the installed package, not ./python

PREFIX_PATH="$("$PYTHON" -c 'import fused_adagrad, torch; print(fused_adagrad.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')"
# The C++ version, without the Python package's local part (+torch2.13cpu).
VERSION="$("$PYTHON" -c 'import fused_adagrad; print(fused_adagrad.build_info()["version"])')"
LIB="$("$PYTHON" -c 'import fused_adagrad, os; print(os.path.join(os.path.dirname(fused_adagrad.__file__), "lib", "libfused_adagrad.so"))')"
GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi

# Show a step's output only when it fails.
quiet() {
  if ! "$@" >"$WORK/log" 2>&1; then
    cat "$WORK/log" >&2
    echo "FAILED: $*" >&2
    exit 1
  fi
}
fail() { echo "FAILED: $*" >&2; exit 1; }
# Whether the last log says $1 (CMake wraps its messages, so compare with whitespace squeezed).
log_says() { tr -s ' \n' '  ' <"$WORK/log" | grep -qF "$1"; }

# PIP_CONSUMER_CMAKE_ARGS: more -D options for every configure (tests/torch_version.sh's hints
# for a CUDA torch's own CMake config).
read -r -a EXTRA_ARGS <<<"${PIP_CONSUMER_CMAKE_ARGS:-}"
configure() {  # source dir, build dir, extra cmake arguments
  cmake -S "$1" -B "$2" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release "${EXTRA_ARGS[@]}" "${@:3}"
}
build() {  # source dir relative to the repository, build dir name
  quiet configure "$ROOT/$1" "$WORK/$2" -DCMAKE_PREFIX_PATH="$PREFIX_PATH"
  quiet cmake --build "$WORK/$2"
}

echo "==> the pip package's libfused_adagrad.so needs no Python"
[ -f "$LIB" ] || fail "$LIB not installed"
if readelf -d "$LIB" | grep NEEDED | grep -i python; then fail "$LIB links Python"; fi

echo "==> examples/cpp against the pip package (fused-adagrad $VERSION)"
build examples/cpp example
"$WORK/example/train" | tee "$WORK/train.out"
grep -q "^fused_adagrad $VERSION " "$WORK/train.out" || fail "no build info line"
# The library it loads is the pip package's, not another install's.
ldd "$WORK/example/train" | grep -q "libfused_adagrad.so => $(realpath "$LIB")" ||
  fail "train does not load $LIB: $(ldd "$WORK/example/train" | grep fused_adagrad)"

echo "==> op registrations under --as-needed"
build tests/cpp/consumer consumer
"$WORK/consumer/op_by_name"
"$WORK/consumer/op_by_name_anchor"

echo "==> find_package with a version, and with a torch of another minor version"
mkdir -p "$WORK/find"
cat >"$WORK/find/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.18)
project(find_fused_adagrad LANGUAGES CXX)
find_package(FusedAdagrad ${REQUEST} CONFIG REQUIRED)
EOF
IFS=. read -r major minor _ <<<"$VERSION"
quiet configure "$WORK/find" "$WORK/find-same" -DCMAKE_PREFIX_PATH="$PREFIX_PATH" -DREQUEST="$VERSION"
if configure "$WORK/find" "$WORK/find-newer" -DCMAKE_PREFIX_PATH="$PREFIX_PATH" \
     -DREQUEST="$major.$((minor + 1))" >"$WORK/log" 2>&1; then
  fail "find_package(FusedAdagrad $major.$((minor + 1))) accepted $VERSION"
fi
log_says "compatible with requested version" || { cat "$WORK/log" >&2; fail "refused for another reason"; }
# A stand-in Torch config whose only content is a version one minor above the real one.
read -r tmajor tminor < <("$PYTHON" -c 'import torch; print(*torch.__version__.split(".")[:2])')
mkdir -p "$WORK/other-torch/Torch"
: >"$WORK/other-torch/Torch/TorchConfig.cmake"
cat >"$WORK/other-torch/Torch/TorchConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$tmajor.$((tminor + 1)).0")
set(PACKAGE_VERSION_COMPATIBLE TRUE)
EOF
FUSED_PREFIX="${PREFIX_PATH%%;*}"
if configure "$WORK/find" "$WORK/find-torch" -DCMAKE_PREFIX_PATH="$FUSED_PREFIX;$WORK/other-torch" \
     >"$WORK/log" 2>&1; then
  fail "the config accepted torch $tmajor.$((tminor + 1)).0"
fi
log_says "was built against torch $tmajor.$tminor" || { cat "$WORK/log" >&2; fail "no torch version message"; }
echo "the config refused torch $tmajor.$((tminor + 1)).0, as it should"
echo "==> pip consumer OK"
