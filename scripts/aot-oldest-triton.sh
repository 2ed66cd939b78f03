#!/usr/bin/env bash
# Compile the sm_90, sm_100 and sm_120 plans (every kernel, real shapes) with the oldest Triton that pyproject.toml
# allows (its "triton>=X" floor), ahead of time, no GPU needed: tests/helpers/aot.py --check in a virtual environment of
# its own (.venv-triton-X in the repository root, made if missing: torch==2.13.0, then triton==X and numpy; the
# package itself is imported from the checkout). Fails on a compile error and on
# any violation of tests/test_aot.py's criteria (shared memory, spills, tensor cores, vector widths, the linear
# kernels' checks). CI runs it after the tests (.ci/run). Extra arguments go to tests/helpers/aot.py, e.g.
#   bash scripts/aot-oldest-triton.sh --targets sm_80,sm_90,sm_100,sm_120,gfx942
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

floor=$(sed -n 's/^ *"triton>=\([0-9][0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
if [ -z "$floor" ]; then
    echo "scripts/aot-oldest-triton.sh: no \"triton>=X\" in pyproject.toml" >&2
    exit 1
fi
PYTHON=${PYTHON:-python3}
VENV=${GVPO_OLDEST_TRITON_VENV:-.venv-triton-$floor}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${pip[@]}" torch==2.13.0  # for meta tensors only: the plans are built on them, nothing runs
fi
if [ "$("$VENV/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null)" != "$floor" ]; then
    "${pip[@]}" "triton==$floor" numpy
fi
echo "# the oldest Triton pyproject.toml allows: triton==$floor in $VENV"
exec env -u TRITON_INTERPRET "$VENV/bin/python" tests/helpers/aot.py --targets sm_90,sm_100,sm_120 --jobs 2 --check "$@"
