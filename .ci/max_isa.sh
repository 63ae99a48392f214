#!/usr/bin/env bash
# The tests that force each CPU kernel, run again as a host whose widest instruction set is
# AVX2, and as one without AVX2: FUSED_ADAGRAD_MAX_ISA hides the wider kernels from the
# selection, so an AVX-512 machine exercises what an AVX2-only (or a pre-AVX2) CPU sees. Each
# hidden kernel must be skipped with its reason, never fail. Needs tests/run.sh's .venv (active)
# and its CMake build (build-cmake).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$ROOT/build"
FORCING_TESTS="every_simd_kernel or every_compiled_kernel or selected_kernel or kernel_request or max_isa"

for isa in avx2 base; do
  echo "==> as a CPU whose widest kernel is $isa (FUSED_ADAGRAD_MAX_ISA=$isa)"
  (cd "$ROOT/tests/python" && FUSED_ADAGRAD_MAX_ISA=$isa python -m pytest -q -p no:cacheprovider -rs \
     test_parity.py test_rowwise.py test_op.py -k "$FORCING_TESTS" | tee "$ROOT/build/max-isa-$isa.log")
  grep -q "this CPU cannot run the avx512 kernel (it runs base" "$ROOT/build/max-isa-$isa.log" || {
    echo "FAILED: no skip for the hidden avx512 kernel" >&2; exit 1; }
  FUSED_ADAGRAD_MAX_ISA=$isa ctest --test-dir "$ROOT/build-cmake" -L forced_kernel --output-on-failure
done
