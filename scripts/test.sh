#!/usr/bin/env bash
# The tests: every backend against the reference, the trainer and the plug-ins. Without CUDA, Triton runs in its
# interpreter. The verl plug-in's tests run afterwards in their own environment (scripts/test-verl.sh), since
# verl pins an older transformers. Extra arguments go to both pytest runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/python -m pytest "$@"
bash scripts/test-verl.sh "$@"
