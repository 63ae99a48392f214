#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions are called by name, through run_stage
# One command for a GPU machine: builds fused-adagrad with its CUDA kernels against the machine's
# own torch (any CUDA build of torch 2.4 to 2.15) and runs what needs a GPU, in this order:
#
#   stage      what                                                      estimate  limit
#   build      pip install of this tree (MAX_JOBS = all cores)           1.5-2.5 m  4.5 m
#   pytest     tests/python/test_cuda*.py                                1.5-2 m    3.5 m
#   memcheck   compute-sanitizer memcheck over tests/python/cuda_every_kernel_once.py
#                                                                        0.5-1 m    2.5 m
#   cpp        every GoogleTest (CUDA ones: tests/cpp/test_cuda.cpp, Checkpoint.Cuda*), all
#              cores                                                     10-30 s    2 m
#   bench      benchmarks/bench_cuda.py, full run: writes                0.5-1.5 m  2.5 m
#              benchmarks/results/cuda-<gpu>-<date>.md and .json
#   bench-sparse  benchmarks/bench_cuda_sparse.py (sparse step, embedding  0.5-1 m    2 m
#              bags): benchmarks/results/cuda-sparse-<gpu>-<date>.md and .json
#   racecheck  compute-sanitizer racecheck over the same script          0.5-1 m    2.5 m
#
# all with FUSED_ADAGRAD_REQUIRE_CUDA=1, so that a CUDA test fails instead of skipping. The C++
# library and tests build in the background from the start, at low priority, beside the Python
# build and the GPU stages (about 1.5-3 min, limit 6 min); cpp waits for that build. bench runs
# alone, after both builds, so no compiler takes its CPU time. Altogether about 7 minutes on an
# H100 or H200 with 16 cores; GPU_CHECK_DEADLINE_S (default 480) caps the whole run, a stage
# getting at most what is left of it, so the summary is always written. racecheck runs last, as
# the stage least likely to find anything here: our kernels use no shared memory.
#
# At the end: one PASS/FAIL/SKIP line per stage (and the last lines of each failed stage's log);
# exit 1 if any stage failed. Every stage runs whatever the others did, but a failed build stops
# everything. cpp is skipped, not failed, without GoogleTest's sources in third_party/googletest.
# Without a GPU (nvidia-smi lists none, or torch sees none) it says so and exits 2 before it
# builds anything.
#
#   bash tests/gpu.sh                           # logs in build/gpu-check/
#   GPU_CHECK_LOGS=/some/dir bash tests/gpu.sh  # or: bash tests/gpu.sh /some/dir
#   GPU_CHECK_PRETEND=1 bash tests/gpu.sh       # dry run here, without GPU: see below
#   TORCH_CUDA_ARCH_LIST=9.0 bash tests/gpu.sh  # kernels for this GPU alone, half the nvcc work
#                                               # (built in 79-112 s on an H200's 16 cores)
#
# Logs: one folder and 8 files at most, so that a runner that returns one folder's files alone
# gets all of it: summary.txt, build.log, pytest.log, sanitizer.log (memcheck and racecheck),
# cpp.log, bench.log (both benchmarks), and copies of the two benchmarks' .md tables (their .json
# stay in benchmarks/results).
#
# Needs: an NVIDIA GPU; python3 (or GPU_CHECK_PYTHON) with a CUDA torch and pip, setuptools,
# wheel, pybind11, packaging, numpy, pytest and ninja; nvcc of torch's CUDA major version (on
# PATH, in CUDA_HOME or /usr/local/cuda); compute-sanitizer; cmake, and GoogleTest's sources in
# third_party/googletest, for cpp. No network: nothing is downloaded. Leaves the install in
# build/gpu-check-work/site and the CMake build in build/gpu-check-work/cmake.
#
# GPU_CHECK_PRETEND=1: no GPU check and no build; the stages that need none of them run against
# the fused_adagrad already installed in .venv (or GPU_CHECK_PYTHON's), and fail for want of a
# GPU, which shows the stage handling, logs and summary on a machine without one.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '3,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi

PRETEND="${GPU_CHECK_PRETEND:-0}"
if [[ "$PRETEND" == 1 ]]; then
  PY="${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}"
  export PYTHONDONTWRITEBYTECODE=1  # leaves no __pycache__ in the tree
else
  PY="${GPU_CHECK_PYTHON:-python3}"
fi
LOGS="${1:-${GPU_CHECK_LOGS:-$ROOT/build/gpu-check}}"
# The install and the CMake build, outside LOGS, which holds logs only.
WORK="$ROOT/build/gpu-check-work"
SITE="$WORK/site"
CMAKE_BUILD="$WORK/cmake"
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-480}"
JOBS="$(nproc)"
export FUSED_ADAGRAD_REQUIRE_CUDA=1

# ---- a GPU, and a torch that sees it: checked before anything is built ------------------------
no_gpu() {
  echo "gpu.sh: no GPU present: ${1#NO }. Nothing was built or run." >&2
  exit 2
}
gpu_capability="" gpu_info="" torch_info="" torch_cmake_prefix=""
if [[ "$PRETEND" != 1 ]]; then
  command -v nvidia-smi >/dev/null || no_gpu "nvidia-smi is not installed"
  [[ "$(nvidia-smi -L 2>/dev/null || true)" == *"GPU "* ]] || no_gpu "nvidia-smi -L lists no GPU"
  command -v "$PY" >/dev/null || no_gpu "$PY not found, so torch cannot be asked"
  # One line, "OK capability torch CUDA cmake-prefix" or "NO why"; warnings go to /dev/null.
  probe="$("$PY" -W ignore -c '
import sys
try:
    import torch
except ImportError as e:
    sys.exit(print(f"NO {sys.executable} cannot import torch ({e})"))
if not torch.cuda.is_available():
    sys.exit(print(f"NO torch {torch.__version__} (CUDA {torch.version.cuda}) sees none: "
                   "torch.cuda.is_available() is False"))
print("OK %d.%d" % torch.cuda.get_device_capability(), torch.__version__, torch.version.cuda,
      torch.utils.cmake_prefix_path)' 2>/dev/null | tail -n 1 || true)"
  [[ "$probe" == OK\ * ]] || no_gpu "${probe:-NO $PY failed to check torch}"
  read -r _ gpu_capability torch_version torch_cuda torch_cmake_prefix <<<"$probe"
  gpu_info="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    sed -n 1p || true)"
  torch_info="torch $torch_version (CUDA $torch_cuda)"
fi
# An absolute path: PATH changes below.
PY="$(command -v "$PY")" || { echo "gpu.sh: $PY not found" >&2; exit 2; }

mkdir -p "$LOGS" "$WORK"
LOGS="$(cd "$LOGS" && pwd)"
rm -f "$LOGS"/{summary.txt,build.log,pytest.log,sanitizer.log,cpp.log,bench.log}

# ninja and cmake may be pip packages of python3's environment, on PATH only when it is
# activated (torch's extension build without ninja compiles one file at a time); nvcc and
# compute-sanitizer are in the CUDA toolkit's bin/, which need not be on PATH.
PATH="$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))'):$PATH"
for cuda in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [[ -n "$cuda" && -x "$cuda/bin/nvcc" ]]; then PATH="$PATH:$cuda/bin"; break; fi
done
export PATH

# ---- stages ------------------------------------------------------------------------------------
summary_lines=() failed=()
declare -A log_of log_lines_of  # per stage: its log, and the first and last line it wrote there
record() {  # NAME STATUS SECONDS [NOTE]
  summary_lines+=("$(printf '%-12s %-4s %4d s  %s' "$1" "$2" "$3" "${4:-}")")
  if [[ "$2" == FAIL ]]; then failed+=("$1"); fi
}

# run_stage NAME LOG CAP FUNCTION: runs FUNCTION, output appended to LOGS/LOG, which must bound its
# long commands with `timeout "$limit"`: CAP seconds, or less when the deadline is nearer.
# FUNCTION may set stage_note for the summary line. Returns FUNCTION's status.
run_stage() {
  local name=$1 log=$2 cap=$3 fn=$4 start=$SECONDS rc=0 first
  log_of[$name]=$log
  limit=$((DEADLINE_S - SECONDS))
  if ((limit > cap)); then limit=$cap; fi
  if ((limit < 20)); then
    record "$name" FAIL 0 "not run: the ${DEADLINE_S} s of GPU_CHECK_DEADLINE_S were spent"
    return 1
  fi
  echo "==> $name (at most $limit s; log: $LOGS/$log)"
  stage_note=""
  touch "$LOGS/$log"
  first=$(($(wc -l <"$LOGS/$log") + 1))
  # Not under `set -e`: a stage function returns the status of the command that failed.
  "$fn" >>"$LOGS/$log" 2>&1 || rc=$?
  log_lines_of[$name]="$first $(wc -l <"$LOGS/$log")"
  if ((rc == 0)); then
    record "$name" PASS $((SECONDS - start)) "$stage_note"
  elif ((rc == 124 || rc == 137)); then
    record "$name" FAIL $((SECONDS - start)) "timed out after $limit s${stage_note:+ $stage_note}"
  else
    record "$name" FAIL $((SECONDS - start)) "exit $rc${stage_note:+ $stage_note}"
  fi
  return "$rc"
}

finish() {
  local name first last
  {
    echo "fused-adagrad GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $SECONDS s in all"
    if [[ "$PRETEND" == 1 ]]; then echo "PRETEND (GPU_CHECK_PRETEND=1): no GPU, nothing built"; fi
    if [[ -n "$gpu_info" ]]; then echo "GPU: $gpu_info; $torch_info"; fi
    if [[ -n "${tools_info:-}" ]]; then echo "$tools_info"; fi
    printf '%s\n' "${summary_lines[@]}"
    if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; else echo "PASSED"; fi
  } >"$LOGS/summary.txt"
  for name in "${failed[@]}"; do
    read -r first last <<<"${log_lines_of[$name]:-1 0}"
    if ((last >= first)); then
      echo
      echo "---- $name failed: the end of its lines in $LOGS/${log_of[$name]}"
      sed -n "${first},${last}p" "$LOGS/${log_of[$name]}" | tail -n 25
    fi
  done
  echo
  cat "$LOGS/summary.txt"
  if ((${#failed[@]})); then exit 1; fi
  exit 0
}

stage_build() {
  # --target, first on PYTHONPATH, rather than a venv: torch and the tools come from python3's
  # environment as they are, even when that is itself a venv (whose packages a venv made from it
  # would not see). --no-index, --no-deps, --no-build-isolation: nothing is fetched.
  timeout --kill-after=15 "$limit" env MAX_JOBS="$JOBS" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip install -v --no-index --no-deps --no-build-isolation --upgrade \
    --target "$SITE" . || return
  "$PY" -c 'import fused_adagrad as f
info, archs = f.build_info(), f.build_info()["cuda_archs"]
print(f"installed fused-adagrad {f.__version__} at {f.__file__}, CUDA kernels for {archs}")
assert info["cuda"] and info["cuda_devices"] > 0, info' || return
  if command -v cuobjdump >/dev/null; then
    # For the record: the machine code and PTX in the library.
    cuobjdump --list-elf --list-ptx "$SITE/fused_adagrad/lib/libfused_adagrad.so" || true
  fi
}

stage_pytest() {
  # From tests/python, as tests/run.sh runs them; fused_adagrad comes from PYTHONPATH.
  (cd tests/python && timeout --kill-after=15 "$limit" "$PY" -m pytest -p no:cacheprovider \
    -q -rfEs --durations=15 test_cuda*.py)
}

sanitize() {  # TOOL [VAR=VALUE...]: the kernel script under compute-sanitizer's TOOL
  local tool=$1
  shift
  echo "==== compute-sanitizer --tool $tool"
  if ! command -v compute-sanitizer >/dev/null; then
    stage_note="(compute-sanitizer not found on PATH or in the CUDA toolkit's bin/)"
    return 127
  fi
  # --report-api-errors no: torch meets CUDA API errors it expects and handles, which would count
  # as errors here; ours raise (C10_CUDA_CHECK), which fails the script.
  timeout --kill-after=15 "$limit" env "$@" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    --target-processes all --report-api-errors no "$PY" tests/python/cuda_every_kernel_once.py ||
    {
      local rc=$?
      if grep -q "Device not supported" "$LOGS/sanitizer.log"; then
        stage_note="(compute-sanitizer cannot use this GPU here: Device not supported)"
      fi
      return "$rc"
    }
}
# Under memcheck every tensor gets a cudaMalloc of its own (see the script's docstring).
stage_memcheck() { sanitize memcheck PYTORCH_NO_CUDA_MEMORY_CACHING=1; }
stage_racecheck() { sanitize racecheck; }

cpp_build_pid=""
stage_cpp() {
  local rc=0
  wait "$cpp_build_pid" || rc=$?
  cpp_build_pid=""
  if ((rc == 124 || rc == 137)); then
    stage_note="(the C++ build timed out)"
    return 1
  elif ((rc != 0)); then
    stage_note="(the C++ build failed: exit $rc)"
    return 1
  fi
  # Every GoogleTest, not only the CUDA ones: this machine's compiler builds them (one linked a
  # second, static libstdc++ that crashed at the first error message); not the slow consumer.
  echo "==== ctest: every GoogleTest"
  timeout --kill-after=15 "$limit" ctest --test-dir "$CMAKE_BUILD" -E cpp_consumer -j "$JOBS" \
    --no-tests=error --output-on-failure --timeout 120
}

bench() {  # SCRIPT: runs benchmarks/SCRIPT, copies the table it wrote to the logs
  local script=$1 results
  echo "==== $script"
  timeout --kill-after=15 "$limit" "$PY" "benchmarks/$script" \
    --out "$ROOT/benchmarks/results" || return
  # Its last line names the two files it wrote.
  results="$(sed -n 's/^wrote \(.*\)\.md and .*\.json$/\1/p' "$LOGS/bench.log" | tail -n 1)"
  if [[ -z "$results" ]]; then
    stage_note="($script named no results file)"
    return 1
  fi
  cp "$results.md" "$LOGS/" && stage_note="${results#"$ROOT"/}.md"
}
stage_bench() { bench bench_cuda.py; }
stage_bench_sparse() { bench bench_cuda_sparse.py; }

# ---- run -----------------------------------------------------------------------------------------
if [[ "$PRETEND" != 1 ]]; then
  tools_info="$PY; nvcc $(nvcc --version 2>/dev/null |
    sed -n 's/.*release \([0-9.]*\).*/\1/p' || true); compute-sanitizer $(compute-sanitizer \
    --version 2>/dev/null | sed -n 's/.*Version //p' | sed -n 1p || true); $(cmake --version \
    2>/dev/null | sed -n 1p || true); $JOBS cores"
fi

# The C++ build, in the background from now on, niced so that the Python build keeps the cores it
# wants (it is the one everything else waits for). CUDA code for this GPU alone: the Python build
# compiles the shipped architectures; this one only has to run here, and compiles in half the time.
cpp_skip=""
if [[ "$PRETEND" == 1 ]]; then
  cpp_skip="pretend: nothing built"
elif [[ ! -f third_party/googletest/CMakeLists.txt ]]; then
  cpp_skip="no GoogleTest sources in third_party/googletest"
elif ! command -v cmake >/dev/null; then
  cpp_skip="cmake not found"
else
  echo "==> cpp build, in the background (log: $LOGS/cpp.log)"
  # shellcheck disable=SC2016  # $1..$4 are bash -c's arguments
  TORCH_CUDA_ARCH_LIST="$gpu_capability" timeout --kill-after=15 360 nice -n 10 bash -c '
    cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$3" &&
      cmake --build "$2" --target fused_adagrad_tests -j "$4"' \
    cpp-build "$ROOT" "$CMAKE_BUILD" "$torch_cmake_prefix" "$JOBS" >"$LOGS/cpp.log" 2>&1 &
  cpp_build_pid=$!
fi
# The background build (timeout's process group: cmake, ninja and the compilers) does not
# outlive this script.
trap 'if [[ -n "$cpp_build_pid" ]]; then kill "$cpp_build_pid" 2>/dev/null || true; fi' EXIT

if [[ "$PRETEND" == 1 ]]; then
  record build SKIP 0 "pretend: nothing built; $PY's fused_adagrad is used"
else
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! run_stage build build.log 270 stage_build; then
    summary_lines+=("(no other stage ran: the build failed)")
    finish
  fi
fi
run_stage pytest pytest.log 210 stage_pytest || true
run_stage memcheck sanitizer.log 150 stage_memcheck || true
if [[ -n "$cpp_skip" ]]; then
  record cpp SKIP 0 "$cpp_skip"
else
  run_stage cpp cpp.log 120 stage_cpp || true
fi
run_stage bench bench.log 150 stage_bench || true
run_stage bench-sparse bench.log 120 stage_bench_sparse || true
run_stage racecheck sanitizer.log 150 stage_racecheck || true
finish
