#!/usr/bin/env bash
# The main job: the fused GVPO loss and its gradient on random data, with per-group statistics.
# Extra arguments go to the demo (see --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m gvpo_kernels.demo "$@"
