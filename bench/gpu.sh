#!/usr/bin/env bash
# One command for a session lent a GPU: the GPU tests, then the GPU benchmark of issue 12 (the linear and logits
# paths at the Qwen2.5-7B head, 4k and 16k tokens, bfloat16, against eager, torch.compile, Liger's fused linear
# GRPO and CCE + GVPO math), then the token-statistics benchmark of issue 13 (bench/stats.py: the anchor pass and
# the log-prob + entropy pass at the same shapes against chunked eager, eager and TRL where it imports), inside the
# device's 10-minute limit for one command. Installs nothing from the
# network: the wheels carried in .whl/ (Liger-Kernel and cut-cross-entropy, see bench/README.md) are installed
# into /tmp/site when present; without them those two providers are reported as skipped. Results (JSON, table,
# PNG, and the logs) go to $OUT when the device tool sets it, else to bench/results/ (logs to /tmp); the token
# statistics' JSON and table to their stats/ folder. Extra arguments go to bench/run.py after the defaults, so they
# override them (e.g. --tokens 4096,16384,32768 or --models qwen2.5-7b,llama-3-8b); STATS_ARGS to bench/stats.py.
#
#   bash bench/gpu.sh                  # python -m gvpo_kernels.check (at most CHECK_S = 100 s; SKIP_CHECK=1: not),
#                                      # tests (at most TESTS_S = 150 s), the benchmark (at most BENCH_S = 430 s,
#                                      # less what the token statistics keep: STATS_S = 110 s), the statistics
#   SKIP_TESTS=1 bash bench/gpu.sh     # the benchmarks only
#   SKIP_BENCH=1 TESTS_S=440 bash bench/gpu.sh   # the tests and the token statistics
#   SKIP_BENCH=1 SKIP_STATS=1 TESTS_S=560 bash bench/gpu.sh   # the tests only, with all of the time
#   LIMIT_S=1200 BENCH_S=900 bash bench/gpu.sh  # a machine without the 10-minute limit
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LIMIT_S=${LIMIT_S:-590}            # the whole script, seconds (the device stops a command at timeout_s <= 600)
TESTS_S=${TESTS_S:-150}            # the tests at most
BENCH_S=${BENCH_S:-430}            # the benchmark at most (issue 12: within 8 minutes)
STATS_S=${STATS_S:-110}            # the token statistics at most (bench/stats.py), kept out of the benchmark's time
[ -n "${SKIP_STATS:-}" ] && STATS_S=0
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

# The self-check first (issue 19): every path against the float64 reference on this GPU, and % of its floors.
check_rc=0
if [ -z "${SKIP_CHECK:-}" ]; then
    echo "== self-check (at most ${CHECK_S:=100} s)"
    timeout "$CHECK_S" python3 -m gvpo_kernels.check --device cuda --json "$RESULTS/check.json" 2>&1 \
        | tee "$LOGS/gpu-check.log"
    check_rc=${PIPESTATUS[0]}
    [ "$check_rc" = 124 ] && echo "gpu.sh: the self-check ran past ${CHECK_S} s and was stopped"
fi

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests (at most ${TESTS_S} s)"
    # the compiled kernels first; then the adversarial, property and token-statistics tests, which run on CUDA
    timeout "$TESTS_S" python3 -m pytest tests/test_gpu.py tests/test_triton_linear.py tests/test_triton_entropy.py \
        tests/test_adversarial.py tests/test_property.py tests/test_token_logprobs.py tests/test_gvpo_loss.py \
        tests/test_linear.py -q \
        -p no:cacheprovider 2>&1 | tee "$LOGS/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" = 124 ] && echo "gpu.sh: the tests ran past ${TESTS_S} s and were stopped"
fi

# No new measurement starts in the last 75 s of the benchmark's time; the slowest single one (a torch.compile,
# or Liger at 16k tokens) fits in them. The JSON is rewritten after every measurement, so a stop keeps what was
# measured (then: python3 bench/report.py <the JSON> re-makes the table and the plot).
bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
    left=$(( LIMIT_S - SECONDS - 5 - STATS_S ))
    bench=$(( BENCH_S < left ? BENCH_S : left ))
    echo "== benchmark (${bench} s)"
    timeout $(( bench > 10 ? bench : 10 )) python3 bench/run.py --device cuda --out "$RESULTS" \
        --models qwen2.5-7b --tokens 4096,16384 --budget-s $(( bench > 90 ? bench - 75 : 15 )) "$@" 2>&1 \
        | tee "$LOGS/gpu-bench.log"
    bench_rc=${PIPESTATUS[0]}
    [ "$bench_rc" = 124 ] && echo "gpu.sh: the benchmark ran past ${bench} s and was stopped"
fi

# The token statistics (issue 13): gvpo_kernels' token_logprobs / linear_token_logprobs against chunked eager,
# eager and TRL (skipped when TRL does not import here); no new provider-and-shape starts in the last 30 s.
stats_rc=0
if [ -z "${SKIP_STATS:-}" ]; then
    left=$(( LIMIT_S - SECONDS - 5 ))
    echo "== token statistics (${left} s)"
    timeout $(( left > 10 ? left : 10 )) python3 bench/stats.py --device cuda --out "$RESULTS/stats" \
        --models qwen2.5-7b --tokens 4096,16384 --budget-s $(( left > 60 ? left - 30 : 15 )) ${STATS_ARGS:-} 2>&1 \
        | tee "$LOGS/gpu-stats.log"
    stats_rc=${PIPESTATUS[0]}
    [ "$stats_rc" = 124 ] && echo "gpu.sh: the token statistics ran past ${left} s and were stopped"
fi

echo "== gpu.sh: self-check exit ${check_rc}, tests exit ${tests_rc}, benchmark exit ${bench_rc}, token statistics" \
     "exit ${stats_rc}, ${SECONDS} s"
[ "$check_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$stats_rc" = 0 ]
