#!/usr/bin/env bash
# The wheelhouse, tested on this machine (docs/gpu.md): a wheelhouse for THIS Python, a fresh venv that gets torch the
# way a GPU node has it (already there), longext installed from the wheelhouse with --no-index, then `longext doctor`
# (CPU subset) in that venv.
#
#   bash scripts/check_wheelhouse.sh [WORK_DIR]        (WORK_DIR/wheelhouse, WORK_DIR/venv, WORK_DIR/doctor)
#
# PYTHON (default: the project's .venv python, which builds DeepSpeed's wheel and must have torch) makes the
# wheelhouse; the fresh venv uses the same interpreter version. torch goes into the fresh venv first, as on a node:
# TORCH_SPEC (default: the torch version of PYTHON) through pip's configured sources -- on this machine a local CPU
# wheel (pip's find-links) that resolves offline; set TORCH_SYSTEM_SITE=1 instead to create the venv with
# --system-site-packages on top of a Python that already has torch (a CUDA image's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/longext-wheelhouse-XXXXXX)}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
mkdir -p "$WORK"
unset PYTHONPATH  # the fresh venv must use what it installed, not a source tree on the path

PY_VERSION=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TORCH_SPEC=${TORCH_SPEC:-torch==$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')}
echo "== wheelhouse for CPython $PY_VERSION in $WORK/wheelhouse"
"$PYTHON" "$ROOT/scripts/wheelhouse.py" --out "$WORK/wheelhouse" --python-version "$PY_VERSION" --glibc "$(ldd --version | head -1 | grep -o '[0-9]\+\.[0-9]\+$')"

echo "== fresh venv $WORK/venv"
rm -rf "$WORK/venv"
BASE=$("$PYTHON" -c 'import sys; print(sys._base_executable)')
if [ "${TORCH_SYSTEM_SITE:-0}" = 1 ]; then
  "$BASE" -m venv --system-site-packages "$WORK/venv"
else
  "$BASE" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC"
fi

echo "== pip install --no-index --find-links $WORK/wheelhouse -e $ROOT[test]"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WORK/wheelhouse" -e "$ROOT[test]"
"$WORK/venv/bin/pip" check

echo "== longext doctor (CPU subset) in the fresh venv"
cd "$WORK"
"$WORK/venv/bin/longext" doctor --out "$WORK/doctor"
