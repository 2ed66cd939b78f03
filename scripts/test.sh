#!/usr/bin/env bash
# The tests: every backend against the reference. Without CUDA, Triton runs in its interpreter.
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m pytest "$@"
