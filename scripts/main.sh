#!/usr/bin/env bash
# The main job: GVPO post-trains a tiny Llama-style model on the built-in addition task, on the CPU in under a
# minute with nothing downloaded, and writes out/gvpo-tiny/ (metrics.jsonl, metrics.png, samples.txt, checkpoint).
# A rerun replaces the previous run there (--resume continues it instead). Extra arguments go to the trainer (see
# --help); on several processes: .venv/bin/torchrun --nproc-per-node 2 -m gvpo_kernels.trainer --output-dir DIR
# The loss demo on random data: .venv/bin/python -m gvpo_kernels.demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
case " $* " in
    *" --resume"*) fresh=() ;;
    *) fresh=(--overwrite) ;;
esac
exec .venv/bin/python -m gvpo_kernels.trainer "${fresh[@]}" "$@"
