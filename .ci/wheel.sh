#!/usr/bin/env bash
# Usage: .ci/wheel.sh OTHER_PYTHON   (with tests/run.sh's .venv active)
# The artifact users install: builds a wheel of this tree against the active venv's torch, checks
# that its version names that torch (0.1.0+torch2.13cpu), installs the wheel (not the source
# tree) into a fresh venv with the same torch, and runs a smoke subset of the suite and the C++
# pip consumer there. Then puts the wheel beside OTHER_PYTHON's torch (another minor version)
# and checks that its import refuses it, naming both torch versions.
set -euo pipefail
OTHER_PYTHON="${1:?usage: .ci/wheel.sh OTHER_PYTHON}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/build/wheel-check"
fail() { echo "wheel: FAILED: $*" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK/dist"

TORCH="$(python -c 'import torch; print(torch.__version__)')"
IFS=. read -r tmajor tminor _ <<<"$TORCH"
echo "==> wheel built against torch $TORCH"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/fused_adagrad-*.whl)"
echo "$(basename "$WHEEL")"
case "$(basename "$WHEEL")" in
  fused_adagrad-*+torch"$tmajor.$tminor"cpu-*|fused_adagrad-*+torch"$tmajor.$tminor"cu[0-9]*-*) ;;
  *) fail "the wheel's version does not name torch $tmajor.$tminor" ;;
esac

echo "==> a fresh venv with torch $TORCH and the wheel alone"
python -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "torch==$TORCH" pytest numpy expecttest
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
(cd "$ROOT/tests/python" &&
  "$WORK/venv/bin/python" -c 'import fused_adagrad, sys; assert "site-packages" in fused_adagrad.__file__, fused_adagrad.__file__' &&
  "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider test_op.py test_optimizer.py)
bash "$ROOT/tests/pip_consumer.sh" "$WORK/venv/bin/python"

OTHER_TORCH="$("$OTHER_PYTHON" -c 'import torch; print(torch.__version__)')"
echo "==> the wheel beside torch $OTHER_TORCH must refuse to import"
"$OTHER_PYTHON" -m pip install -q --no-deps --target "$WORK/other" "$WHEEL"
if (cd "$WORK" && PYTHONPATH="$WORK/other" "$OTHER_PYTHON" -c 'import fused_adagrad') 2>"$WORK/other.log"; then
  fail "the wheel for torch $TORCH imported under torch $OTHER_TORCH"
fi
tail -n 1 "$WORK/other.log"
grep -q "built against torch $tmajor.$tminor" "$WORK/other.log" && grep -q "runs torch $OTHER_TORCH" "$WORK/other.log" ||
  fail "the import error does not name both torch versions"
echo "==> wheel OK"
