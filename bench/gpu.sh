#!/usr/bin/env bash
# One command for a session lent a GPU: the GPU tests, then the GPU benchmark, inside the device's 10-minute limit
# for one command. Installs nothing from the network: the wheels carried in .whl/ (Liger-Kernel and
# cut-cross-entropy, see bench/README.md) are installed into /tmp/site when present; without them those two
# providers are reported as skipped. Results (JSON, table, PNG, and the logs) go to $OUT when the device tool
# sets it, else to bench/results/ (logs to /tmp). Extra arguments go to bench/run.py.
#
#   bash bench/gpu.sh                  # tests + benchmark
#   SKIP_TESTS=1 bash bench/gpu.sh     # benchmark only (all of the time budget)
#   LIMIT_S=1200 bash bench/gpu.sh     # a machine without the 10-minute limit
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LIMIT_S=${LIMIT_S:-570}            # the whole script, seconds (the device stops a command at 600)
RESULTS=${OUT:-bench/results}
LOGS=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$LOGS"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu.sh: installing the carried wheels from .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu.sh: no .whl/ here: Liger-Kernel and cut-cross-entropy will be reported as skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this checkout's gvpo_kernels, installed or not

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                'cuda', torch.cuda.is_available())"

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests (at most 240 s)"
    timeout 240 python3 -m pytest tests/test_gpu.py tests/test_gvpo_loss.py tests/test_linear.py -q 2>&1 \
        | tee "$LOGS/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" = 124 ] && echo "gpu.sh: the tests ran past 240 s and were stopped"
fi

# No new measurement starts after the budget; the slowest single one (a torch.compile, or Liger at 32k tokens)
# fits in the 60 s left after it. The JSON is rewritten after every measurement, so a stop keeps what was measured
# (then: python3 bench/report.py <the JSON> re-makes the table and the plot).
left=$(( LIMIT_S - SECONDS ))
echo "== benchmark (${left} s left)"
timeout $(( left > 10 ? left - 5 : 5 )) python3 bench/run.py --device cuda --out "$RESULTS" \
    --budget-s $(( left > 90 ? left - 75 : 15 )) "$@" 2>&1 | tee "$LOGS/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== gpu.sh: tests exit ${tests_rc}, benchmark exit ${bench_rc}, ${SECONDS} s"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
