#!/usr/bin/env bash
# Compiles every cuda/*.cu to an object file with nvcc, with the flags setup.py's CUDA build
# uses (ours and the default architectures from build_settings.env, as setup.py and CMake read
# them), so CUDA code that does not compile never lands, even on machines without a GPU and
# with a CPU-only torch (which cannot link these objects, but ships the headers they need).
#
#   .ci/compile_cuda.sh              # architectures from TORCH_CUDA_ARCH_LIST, default in build_settings.env
#   PTXAS_VERBOSE=1 .ci/compile_cuda.sh   # also print registers and spills per kernel
#   CUDA_STD=c++20 .ci/compile_cuda.sh    # as recent torch builds extensions (2.13 does)
#
# Uses whatever `python` is on PATH to find torch's headers; exits 0 when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

setting() {  # NAME: its value in build_settings.env
  grep -q "^$1=\"" build_settings.env || { echo "compile_cuda: no $1 in build_settings.env" >&2; exit 1; }
  sed -n "s/^$1=\"\(.*\)\"\$/\1/p" build_settings.env
}
default_archs="$(setting CUDA_ARCH_LIST)"
nvcc_flags="$(setting NVCC_FLAGS)"
read -r -a nvcc_flags <<<"$nvcc_flags"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  for candidate in nvcc "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if command -v "$candidate" >/dev/null 2>&1; then NVCC="$(command -v "$candidate")"; break; fi
  done
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): CUDA compile check skipped"
  exit 0
fi

shopt -s nullglob
sources=(cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda: no cuda/*.cu files"
  exit 0
fi

mapfile -t torch_includes < <(python -c \
  "import torch.utils.cpp_extension as e; print('\n'.join(e.include_paths()))")
cxx11_abi="$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A CPU-only torch lacks c10/cuda/impl/cuda_cmake_macros.h, which a CUDA build of torch
# generates; write the same content into the temporary build dir.
include_flags=(-Icsrc)
for dir in "${torch_includes[@]}"; do include_flags+=("-I$dir"); done
if [[ ! -f "${torch_includes[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  read -r cuda_major cuda_minor < <("$NVCC" --version |
    sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  mkdir -p "$work/stub/c10/cuda/impl"
  cat >"$work/stub/c10/cuda/impl/cuda_cmake_macros.h" <<EOF
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
#define TORCH_CUDA_VERSION_MAJOR ${cuda_major}
#define TORCH_CUDA_VERSION_MINOR ${cuda_minor}
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
EOF
  include_flags+=("-I$work/stub")
  echo "compile_cuda: torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU-only build): using a stub"
fi

# TORCH_CUDA_ARCH_LIST as torch reads it: "8.0;9.0", "8.0 9.0+PTX", "9.0a".
arch_flags=()
arch_names=()
for arch in $(tr ';' ' ' <<<"${TORCH_CUDA_ARCH_LIST:-$default_archs}"); do
  number="${arch%+PTX}"
  if [[ ! "$number" =~ ^[0-9]+\.[0-9]+[a-z]?$ ]]; then
    echo "compile_cuda: cannot read '$arch' in TORCH_CUDA_ARCH_LIST (use numbers like 8.0;9.0+PTX)" >&2
    exit 1
  fi
  sm="${number/./}"
  arch_flags+=("-gencode=arch=compute_${sm},code=sm_${sm}")
  arch_names+=("sm_${sm}")
  if [[ "$arch" == *+PTX ]]; then
    arch_flags+=("-gencode=arch=compute_${sm},code=compute_${sm}")
    arch_names+=("compute_${sm} (PTX)")
  fi
done

# The flags torch.utils.cpp_extension gives nvcc for setup.py's CUDAExtension, plus ours. The
# default standard is the oldest one torch >= 2.4 builds extensions with.
std="${CUDA_STD:-c++17}"
flags=(-c "-std=$std" "${nvcc_flags[@]}" -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  "-D_GLIBCXX_USE_CXX11_ABI=${cxx11_abi}"
  -DFUSED_ADAGRAD_WITH_CUDA -DFUSED_ADAGRAD_BUILDING_LIBRARY)
if [[ "$std" == c++17 ]]; then
  # Recent torch headers use C++20 bit-field initializers, accepted in C++17 with a warning.
  flags+=(-diag-suppress=3306 -Xcompiler -Wno-c++20-extensions)
fi
if [[ "${PTXAS_VERBOSE:-0}" == 1 ]]; then flags+=(-Xptxas -v); fi

echo "compile_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "compile_cuda: architectures: ${arch_names[*]}; -std=$std"
for src in "${sources[@]}"; do
  obj="$work/$(basename "${src%.cu}").o"
  if ! "$NVCC" "${flags[@]}" "${arch_flags[@]}" "${include_flags[@]}" "$src" -o "$obj"; then
    echo "compile_cuda: FAILED to compile $src" >&2
    exit 1
  fi
  echo "compile_cuda: compiled $src -> $(basename "$obj") ($(stat -c %s "$obj") bytes)"
done
echo "compile_cuda: all ${#sources[@]} CUDA source(s) compiled"
