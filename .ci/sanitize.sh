#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer, part of ASan) run of the C++
# library and the GoogleTest suite: builds both, instrumented, in build-asan/, then runs every
# ctest test but cpp_consumer (which installs and builds projects outside the tree): the suite
# on the CPU's best kernel, test by test, and whole on each of the base/avx2/avx512 kernels
# (FUSED_ADAGRAD_CPU_KERNEL). Fails on any test failure and on any sanitizer report.
#
#   bash .ci/sanitize.sh        # from the repository root, after tests/run.sh (which made .venv)
#
# Installs nothing. Environment: FUSED_ADAGRAD_VENV (as tests/setup_env.sh), MAX_JOBS (default
# nproc), FUSED_ADAGRAD_SANITIZE_BUILD (build directory, default build-asan). The build directory
# is kept, so a second run only rebuilds what changed.
#
# How it is set up, and why:
# * Flags on the cmake command line only (CMAKE_CXX_FLAGS and the linker flags), so that the
#   library, the test executable and the link all get them and CMakeLists.txt knows nothing of
#   sanitizers. -O1 -g1 (RelWithDebInfo with its flags replaced): -O2 -g made a test source's
#   compile 2.1x slower in CPU time (most of it the debug info of torch's headers) for nothing
#   a report needs; -g1 keeps the line tables, so reports still name file:line. The library's
#   own flags (build_settings.env, -O3) come after these, so its sources, the kernels among
#   them, are checked as optimized as they ship. No -DNDEBUG: torch's
#   TORCH_INTERNAL_ASSERT_DEBUG_ONLY checks in the headers we inline stay on.
#   -D_GLIBCXX_ASSERTIONS adds libstdc++'s bounds checks (operator[], front(), back()); it
#   changes no layout, so it mixes with the uninstrumented libtorch.
# * libtorch is not instrumented, and need not be: the test executable is linked with
#   -fsanitize=address, so libasan.so is its first DT_NEEDED and is loaded before libtorch (no
#   LD_PRELOAD needed; ASan itself aborts with "ASan runtime does not come first" otherwise).
#   Memory libtorch allocates is still checked where our code touches it (malloc/free are
#   intercepted process-wide); libtorch's own accesses are not.
# * Leaks: checked (detect_leaks=1), with no suppression: libtorch's static allocations stay
#   reachable from its globals, so LeakSanitizer does not report them.
# * UBSan: -fsanitize=undefined plus float-cast-overflow (float to integer out of range; GCC
#   leaves it out of "undefined"), all fatal (-fno-sanitize-recover=all). No suppression needed.
# * OpenMP (torch's parallel_for, libgomp) works under ASan as is. OMP_NUM_THREADS=2 (unless
#   set): every step large enough is split over two threads, so the per-thread range
#   arithmetic runs instrumented on any machine, without oversubscribing a big one under
#   ctest -j. OMP_WAIT_POLICY=PASSIVE (unless set): libgomp's idle threads otherwise spin
#   between parallel regions, taking the CPU from the tests (and under ctest -j from each
#   other): one whole-suite run on a busy 2-core machine took 20.5 s CPU / 32 s wall with
#   spinning, 4.5 s / 7.7 s without; this script's test phase, at the same load, from 232 s
#   CPU / 357 s wall to 84 s / 118 s.
# * Every report also goes to $BUILD/sanitizer-logs/ (log_path; GCC's UBSan runtime writes only
#   its SUMMARY line there and the message with its stack to the test's output, which ctest
#   prints), and any file there fails the run: a report in a process that still exited 0 (or
#   in the test listing at build time) cannot pass unseen. Checked once with a deliberate heap
#   overflow, signed overflow and leak in a scratch copy of the tree: each failed the run.
# * CPU only: CUDA (nvcc code, the CUDA driver) is not instrumented, so the build is
#   FUSED_ADAGRAD_WITH_CUDA=OFF, GPUs are hidden, FUSED_ADAGRAD_REQUIRE_CUDA is unset and the
#   CUDA tests skip.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
start=$SECONDS

VENV="${FUSED_ADAGRAD_VENV:-$ROOT/.venv}"
if [ ! -f "$VENV/bin/activate" ]; then
  echo "sanitize: no virtual environment at $VENV: run tests/run.sh first" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

BUILD="${FUSED_ADAGRAD_SANITIZE_BUILD:-$ROOT/build-asan}"
JOBS="${MAX_JOBS:-$(nproc)}"
LOGS="$BUILD/sanitizer-logs"
mkdir -p "$BUILD"
rm -rf "$LOGS"
mkdir -p "$LOGS"

unset FUSED_ADAGRAD_REQUIRE_CUDA
export CUDA_VISIBLE_DEVICES=""
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Set before the build too: gtest_discover_tests runs the instrumented binary to list the tests.
# Options given by the caller come last and win (e.g. ASAN_OPTIONS=verbosity=1).
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:strict_string_checks=1:print_summary=1:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1:print_summary=1:log_path=$LOGS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

SAN="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer"

report_logs() {  # prints every sanitizer report; returns 1 when there is one
  local files
  files="$(find "$LOGS" -type f | sort)"
  [ -z "$files" ] && return 0
  echo
  echo "==> sanitizer reports ($(echo "$files" | wc -l) files in $LOGS)"
  while IFS= read -r f; do
    echo "---- $f"
    cat "$f"
  done <<<"$files"
  return 1
}

echo "==> sanitize: configure $BUILD (ASan + UBSan, -O1 -g1)"
cmake -S "$ROOT" -B "$BUILD" -G Ninja \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DCMAKE_CXX_FLAGS="$SAN -D_GLIBCXX_ASSERTIONS" \
  -DCMAKE_EXE_LINKER_FLAGS="$SAN" \
  -DCMAKE_SHARED_LINKER_FLAGS="$SAN" \
  -DFUSED_ADAGRAD_WITH_CUDA=OFF \
  -DFUSED_ADAGRAD_BUILD_TESTS=ON >/dev/null

echo "==> sanitize: build (-j $JOBS)"
build_start=$SECONDS
if ! cmake --build "$BUILD" -j "$JOBS"; then
  report_logs || true
  echo "sanitize: FAILED (build)" >&2
  exit 1
fi
build_s=$((SECONDS - build_start))

echo "==> sanitize: ctest (all but cpp_consumer, -j $JOBS)"
test_start=$SECONDS
ctest_rc=0
ctest --test-dir "$BUILD" -E '^cpp_consumer$' --output-on-failure -j "$JOBS" --timeout 900 \
  | tee "$BUILD/ctest.log" || ctest_rc=$?
test_s=$((SECONDS - test_start))

reports=0
report_logs || reports=$(find "$LOGS" -type f | wc -l)
tests_line="$(grep -E 'tests passed|tests failed' "$BUILD/ctest.log" | tail -1 || true)"

echo
echo "==> sanitize summary"
echo "    build:   ${build_s}s    tests: ${test_s}s    total: $((SECONDS - start))s"
echo "    ctest:   ${tests_line:-no result} (exit $ctest_rc)"
echo "    reports: $reports sanitizer report file(s) in $LOGS"
if [ "$ctest_rc" -ne 0 ] || [ "$reports" -ne 0 ]; then
  echo "sanitize: FAILED" >&2
  exit 1
fi
echo "sanitize: passed (ASan, UBSan, LeakSanitizer: no reports)"
