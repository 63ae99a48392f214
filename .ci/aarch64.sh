#!/usr/bin/env bash
# aarch64 correctness guard (issue 13): builds the torch-free CPU kernels (csrc/cpu/kernel_*.cpp)
# with their standalone check (tests/kernel_check) for this machine and, cross-compiled, for
# aarch64, and runs both: the aarch64 binary is static and runs under qemu-user, no sysroot.
# Needs g++; the aarch64 half needs g++-aarch64-linux-gnu and qemu-user, installed here when
# missing if we are root with apt-get, else skipped with a message (FUSED_ADAGRAD_REQUIRE_AARCH64=1
# makes that an error). On an aarch64 machine the native build is the aarch64 check.
# KERNEL_CHECK_STRIDE: odd stride of the float sweep (default 257, ~17M patterns per format).
# Costs about 45 s of CPU time, most of it compiling (the qemu run: ~9 s), which the compiles
# split over the cores: 151 s wall measured on 2 cores shared with a load average of 10.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${KERNEL_CHECK_BUILD:-$ROOT/build-kernel-check}"
STRIDE="${KERNEL_CHECK_STRIDE:-257}"
# The extension's own C++ flags, from build_settings.env where setup.py and CMakeLists.txt read
# them (read, never sourced), and nothing target-specific: the AVX kernels select their ISA with
# pragmas and compile to nothing off x86-64, so an x86-only flag there fails the aarch64 build.
FLAGS=(-O3 -ffp-contract=off -fno-math-errno)
if [ -f "$ROOT/build_settings.env" ]; then
  settings_flags="$(sed -n 's/^CXX_FLAGS="\([^"]*\)"$/\1/p' "$ROOT/build_settings.env")"
  if [ -n "$settings_flags" ]; then read -r -a FLAGS <<<"$settings_flags"; fi
fi
FLAGS=(-std=c++17 "${FLAGS[@]}")
SOURCES=(csrc/cpu/kernel_base.cpp csrc/cpu/kernel_avx2.cpp csrc/cpu/kernel_avx512.cpp)
start=$SECONDS

# build CXX OUT [LINK FLAG...]: compiles the check and the kernel sources in parallel, then links.
build() {
  local cxx="$1" out="$2"
  shift 2
  local dir="$out.obj" pids=() objs=() failed=0 src obj pid
  mkdir -p "$dir"
  # The check's references need a * b + c unfused whatever the project's flags say.
  "$cxx" "${FLAGS[@]}" -ffp-contract=off -Wall -Wextra \
    -c "$ROOT/tests/kernel_check/kernel_check.cpp" -o "$dir/kernel_check.o" &
  pids+=($!)
  objs+=("$dir/kernel_check.o")
  for src in "${SOURCES[@]}"; do
    obj="$dir/$(basename "$src" .cpp).o"
    "$cxx" "${FLAGS[@]}" -c "$ROOT/$src" -o "$obj" &
    pids+=($!)
    objs+=("$obj")
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if [ "$failed" != 0 ]; then
    echo "error: compiling the kernel check with $cxx failed" >&2
    exit 1
  fi
  "$cxx" "$@" -o "$out" "${objs[@]}"
}

mkdir -p "$BUILD"
host_arch="$(uname -m)"
echo "==> kernel check, host build ($host_arch, ${CXX:-g++} ${FLAGS[*]})"
build "${CXX:-g++}" "$BUILD/kernel_check_host"
"$BUILD/kernel_check_host" "$STRIDE"

if [ "$host_arch" = aarch64 ] || [ "$host_arch" = arm64 ]; then
  echo "==> the host is aarch64: the host build above was the aarch64 check ($((SECONDS - start))s)"
  exit 0
fi

qemu() { command -v qemu-aarch64 || command -v qemu-aarch64-static; }
have_tools() { command -v aarch64-linux-gnu-g++ >/dev/null && qemu >/dev/null; }
if ! have_tools && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing g++-aarch64-linux-gnu and qemu-user"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null; } ||
    echo "apt-get could not install g++-aarch64-linux-gnu qemu-user" >&2
fi
if ! have_tools; then
  message="the aarch64 check needs aarch64-linux-gnu-g++ (g++-aarch64-linux-gnu) and qemu-aarch64 (qemu-user): install them, or run this as root where apt-get works"
  if [ "${FUSED_ADAGRAD_REQUIRE_AARCH64:-0}" = 1 ]; then
    echo "error: $message (FUSED_ADAGRAD_REQUIRE_AARCH64=1)" >&2
    exit 1
  fi
  echo "==> SKIPPED: $message"
  exit 0
fi

echo "==> kernel check, aarch64 build (aarch64-linux-gnu-g++ -static), run under $(qemu)"
build aarch64-linux-gnu-g++ "$BUILD/kernel_check_aarch64" -static
"$(qemu)" "$BUILD/kernel_check_aarch64" "$STRIDE"
echo "==> kernel checks passed, host and aarch64, in $((SECONDS - start))s"
