#!/usr/bin/env bash
# The verl plug-in's tests, in their own virtual environment: verl 0.9.1 pins transformers < 5.11, which the
# TRL plug-in (transformers 5.x) in .venv cannot share. Creates .venv-verl in the repository root if missing
# (torch==2.13.0 first where there is no CUDA, so that nothing pulls a CUDA build; then this package with its
# verl and dev extras: verl plus TransferQueue, cachetools, fastapi and uvicorn, which verl's default v1 trainer
# module imports and verl's own `verl` package does not require), re-installing when pyproject.toml changed,
# then runs tests/test_verl.py there (about a minute on 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-verl
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.gvpo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch==2.13.0
    fi
    "${pip[@]}" -e ".[verl,dev]"
    touch "$stamp"
fi
exec "$VENV/bin/python" -m pytest tests/test_verl.py "$@"
