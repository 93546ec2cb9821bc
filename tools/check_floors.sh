#!/usr/bin/env bash
# Does spectral-lens work on the minimum versions pyproject.toml declares? Builds a Python 3.10 virtual
# environment with exactly those floors and runs the test tiers that need only the core dependencies.
#
#   tools/check_floors.sh                      # tests/core tests/gradients tests/analysis tests/reliability
#   tools/check_floors.sh tests/core -k sync   # any pytest arguments instead
#
# Installs: torch 2.4.1 (PyPI's wheel is a CUDA build: with its nvidia-* and triton 3.0.0 wheels about
# 3 GB to download, 5 GB on disk; it runs on the CPU), numpy 1.24.4, scipy 1.10.1, opt_einsum 3.3.0,
# tqdm 4.60.0, pytest, hypothesis; spectral-lens itself editable from this checkout (--no-deps).
# No extras: tests that need one skip. The four tiers took 15 to 25 minutes on 2 CPU cores (2026-11-28: 1441
# passed, 131 skipped; longer on a loaded machine) plus the download. Not run by CI (too heavy); CI
# and the project's own .venv are untouched.
#
# Environment: PYTHON310 (default: python3.10 on PATH), FLOORS_VENV (default: /tmp/spectral-lens-floors;
# reused when it exists, so a rerun skips the download). Afterwards: rm -r "$FLOORS_VENV"; pip cache purge.
# Last results (2026-11-28) are in docs/index.md ("Supported versions").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON310:-python3.10}
VENV=${FLOORS_VENV:-/tmp/spectral-lens-floors}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 10), sys.version' \
        || { echo "check_floors.sh: $PY is not Python 3.10 (set PYTHON310)" >&2; exit 2; }
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==2.4.1" "numpy==1.24.4" "scipy==1.10.1" "opt_einsum==3.3.0" \
        "tqdm==4.60.0" pytest hypothesis
    "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
fi
"$VENV/bin/python" -c 'import numpy, scipy, torch, spectral_lens as sl
print("floors:", "torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__,
      "spectral_lens from", sl.__file__)'

cd "$ROOT"
if [ "$#" -eq 0 ]; then
    set -- tests/core tests/gradients tests/analysis tests/reliability
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@"
