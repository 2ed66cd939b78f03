#!/usr/bin/env bash
# The GPU run, for a session lent a GPU (one command of at most 10 minutes; nothing reached from there): the
# package's self-check (where gvpo_kernels.check exists), the GPU tests, the token statistics' stats+bwd pass at
# Liger-Kernel's published shape (liger-ref: 8k tokens, H 4096, V 131072) against Liger's fused cross-entropy, then
# `python -m bench loss` (Qwen2.5-7B head at 4k tokens, liger-ref, Qwen2.5-7B at 16k) and `python -m bench stats`
# (Qwen2.5-7B at 4k, 16k) on CUDA in bf16 against eager, torch.compile and the peers, the GPU anchors included
# (Liger's Triton and CuTe fused cross-entropies, QuACK's). The peers come from the wheels carried in .whl/,
# installed into /tmp/gvpo-bench/site-packages; a peer whose wheels are missing is reported as skipped. Results and
# gpu.log go to $OUT (the device tool sets it), else bench/results/ (the log to /tmp). bench/README.md: how to carry.
#
#   bash bench/gpu.sh fetch     # HERE, with network: the wheels into .whl/wheels, .whl/cute-1 and .whl/cute-2
#   bash bench/gpu.sh stage     # GPU call 1 (carry .whl/cute-1): keeps the first half of the CuTe DSL in /tmp
#   bash bench/gpu.sh [ARGS]    # GPU call 2 (carry .whl/wheels, .whl/cute-2), at once: the run; ARGS go to the
#                               # loss benchmark after its defaults (e.g. --shapes qwen2.5-7b:4096)
#   SKIP_CHECK=1 SKIP_TESTS=1 SKIP_ANCHOR=1 SKIP_BENCH=1 SKIP_STATS=1: leave a phase out; CHECK_S, TESTS_S,
#   ANCHOR_S, STATS_S: its seconds
#   (the loss benchmark gets what is left of LIMIT_S); STATS_ARGS go to the token statistics
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SITE=/tmp/gvpo-bench/site-packages   # "site-packages" in the path: QuACK fingerprints code outside it (and fails)
STAGE=/tmp/gvpo-bench/stage
CUTE=nvidia-cutlass-dsl-libs-cu12==4.8.1   # the CuTe DSL's compiler, 92 MB as a wheel: it travels in two halves

if [ "${1:-}" = fetch ]; then
    set -e
    rm -rf .whl/wheels .whl/cute-1 .whl/cute-2 && mkdir -p .whl/wheels .whl/cute-1 .whl/cute-2
    get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
    get .whl/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 \
        nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 \
        torch-c-dlpack-ext==0.1.5
    tmp=$(mktemp -d) && get "$tmp" "$CUTE" && (cd "$tmp" && python3 -m zipfile -e ./*.whl tree)
    tar -C "$tmp/tree" -cf - . | xz -T0 -9 > "$tmp/cute.tar.xz"
    (cd "$tmp" && sha256sum cute.tar.xz) > .whl/cute-2/cute.tar.xz.sha256
    half=$(( ($(stat -c %s "$tmp/cute.tar.xz") + 1) / 2 ))
    head -c "$half" "$tmp/cute.tar.xz" > .whl/cute-1/cute.tar.xz.1
    tail -c +$(( half + 1 )) "$tmp/cute.tar.xz" > .whl/cute-2/cute.tar.xz.2
    rm -rf "$tmp"
    du -sh .whl/wheels .whl/cute-1 .whl/cute-2
    exit 0
fi
if [ "${1:-}" = stage ]; then
    mkdir -p "$STAGE" && cp .whl/cute-1/cute.tar.xz.1 "$STAGE"/ && ls -l "$STAGE" && exit 0
    echo "gpu.sh stage: no .whl/cute-1/cute.tar.xz.1 here (carry .whl/cute-1)" >&2; exit 1
fi

LIMIT_S=${LIMIT_S:-590}   # the whole script (the device stops a command at timeout_s <= 600)
CHECK_S=${CHECK_S:-60}
TESTS_S=${TESTS_S:-120}
ANCHOR_S=${ANCHOR_S:-90}
STATS_S=${STATS_S:-100}   # kept out of the loss benchmark's time
[ -n "${SKIP_STATS:-}" ] && STATS_S=0
RESULTS=${OUT:-bench/results}
LOGS=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$LOGS" "$SITE"
exec > >(tee "$LOGS/gpu.log") 2>&1

wheels=$(ls .whl/*.whl .whl/wheels/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels \
        || echo "gpu.sh: installing the carried wheels failed: the peers will be reported as skipped"
else
    echo "gpu.sh: no wheels in .whl/: Liger-Kernel, cut-cross-entropy and QuACK will be reported as skipped"
fi
if [ -f .whl/cute-2/cute.tar.xz.2 ] && [ -f "$STAGE/cute.tar.xz.1" ]; then
    cat "$STAGE/cute.tar.xz.1" .whl/cute-2/cute.tar.xz.2 > "$STAGE/cute.tar.xz"
    if (cd "$STAGE" && sha256sum -c --quiet "$OLDPWD/.whl/cute-2/cute.tar.xz.sha256"); then
        xz -dc "$STAGE/cute.tar.xz" | tar -C "$SITE" -xf - && echo "gpu.sh: CuTe DSL compiler installed"
    else
        echo "gpu.sh: the two halves of the CuTe DSL do not match (sha256): its peers will be reported as skipped"
    fi
else
    echo "gpu.sh: no CuTe DSL compiler (it needs 'bash bench/gpu.sh stage' with .whl/cute-1 on this machine first," \
         "then this call with .whl/cute-2): Liger's CuTe path and QuACK will be reported as skipped"
fi
# PYTHONPATH reads no .pth file: the CuTe DSL's own entry is added by hand
export PYTHONPATH=$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                'cuda', torch.cuda.is_available())"
rc=()
phase() {  # phase NAME SECONDS COMMAND...: run it for at most SECONDS, remember its exit status
    local name=$1 limit=$2; shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@"
    local status=$?
    [ "$status" = 124 ] && echo "gpu.sh: $name ran past ${limit} s and was stopped"
    rc+=("$name $status")
}

if [ -z "${SKIP_CHECK:-}" ] && python3 -c "import gvpo_kernels.check" 2>/dev/null; then
    phase self-check "$CHECK_S" python3 -m gvpo_kernels.check --device cuda
fi
if [ -z "${SKIP_TESTS:-}" ]; then
    # the compiled kernels first; then the tests that run on CUDA (those files that exist in this checkout)
    tests=$(ls tests/test_gpu.py tests/test_triton_linear.py tests/test_*entropy*.py tests/test_adversarial.py \
        tests/test_property.py tests/test_token_logprobs.py tests/test_gvpo_loss.py tests/test_linear.py 2>/dev/null)
    phase tests "$TESTS_S" python3 -m pytest $tests -q -p no:cacheprovider
fi
# Liger's published shape first: its CuTe path's fwd+bwd with entropy (50.2 ms on an H100) against ours
if [ -z "${SKIP_ANCHOR:-}" ]; then
    phase "Liger's shape" "$ANCHOR_S" python3 -m bench stats --device cuda --out "$RESULTS/liger-ref" \
        --shapes liger-ref:8192 --passes stats+bwd --only "gvpo-auto,liger-fused-ce,chunked eager"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    # no new measurement in the last 75 s: the slowest single one (a compilation at 16k tokens) fits in them; the
    # JSON is rewritten after each, so a stop keeps what was measured (python3 -m bench report <JSON>)
    s=$(( LIMIT_S - SECONDS - 5 - STATS_S )); s=$(( s > 10 ? s : 10 ))
    phase benchmark "$s" python3 -m bench loss --device cuda --out "$RESULTS" \
        --shapes qwen2.5-7b:4096,liger-ref:8192,qwen2.5-7b:16384 \
        --budget-s $(( s > 90 ? s - 75 : 5 )) "$@"
fi
if [ -z "${SKIP_STATS:-}" ]; then
    s=$(( LIMIT_S - SECONDS - 5 )); s=$(( s > 10 ? s : 10 ))
    phase "token statistics" "$s" python3 -m bench stats --device cuda --out "$RESULTS/stats" \
        --shapes qwen2.5-7b:4096,qwen2.5-7b:16384 \
        --budget-s $(( s > 60 ? s - 40 : 5 )) ${STATS_ARGS:-}
fi
echo "== gpu.sh: ${rc[*]:-nothing run}; ${SECONDS} s"
for r in "${rc[@]}"; do [ "${r##* }" = 0 ] || exit 1; done
