#!/usr/bin/env bash
# Create .venv in the repository root (if missing) and install the package with the extras the tests and the
# main job use: dev (pytest), train (transformers, the trainer) and trl (the TRL plug-in).
# On machines without CUDA, torch==2.13.0 (a CPU build) is installed first so that nothing pulls a CUDA build.
# Sourced by scripts/main.sh and scripts/test.sh; re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.gvpo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch==2.13.0
    fi
    "${pip[@]}" -e ".[dev,train,trl]"
    touch "$stamp"
fi
