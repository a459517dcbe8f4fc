#!/usr/bin/env bash
# gpu_check.sh — one short run on a lent GPU machine that settles every GPU question of taillor and ends with a
# verdict table. Made for a fresh machine with torch, triton and Python preinstalled and no network.
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
#   --dry-run   check the arguments, print the plan (stages, budgets, their sum and the cap) and whether a GPU is
#               visible; run nothing, write nothing (exit 0; CI runs this on the CPU).
#
# Stages, in this order (each under `timeout`, each given min(its budget, the time left before the cap):
#   install      pip install --no-deps --no-build-isolation -e . without the CUDA extension (seconds)
#   ext_build    starts in the background right after the install: builds taillor._C for this GPU's arch on idle
#                cores (nice, MAX_JOBS=4) while the GPU stages run; ext_wait waits for it before ext_tests
#   info         taillor info --json
#   tests        compiled-correctness tests: pytest -m gpu on the op-stem test files of the Triton kernels
#                (test_tail_adapter, test_spectral_projection, test_spectral_penalty) and test_kernel_launch
#   speed        the speed-target shape (bf16, 8192 tokens, 4096x4096, r=16): nn.Linear, PEFT LoRA, TailLoRLinear
#                eager / Triton fused / Triton split; no torch.compile; one frame (one exact SVD) shared by all
#                TailLoR rows; every TailLoR output compared with eager (a mismatch marks the row FAILED)
#   ext_wait     wait for ext_build
#   ext_tests    pytest -m gpu tests/test_cuda_extension.py tests/test_randomized_svd.py (TAILLOR_REQUIRE_CUDA_EXT=1
#                if the build succeeded)
#   frames       taillor bench --suites frames: build_frames on a Llama-7B-shaped model (224 matrices, head 256)
#   report       OUT_DIR/RESULTS.md (also printed), ending with the verdict table of every GPU goal
#
# Output: exactly two files, OUT_DIR/RESULTS.md and OUT_DIR/gpu-check.tar.gz (every log, the JUnit XML of the
# tests and the benchmark JSON), so that a remote machine can return it (at most 8 files, 2 folders deep).
# Environment: PYTHON (default python3), GPU_CHECK_CAP_S (default 465: under 8 minutes with start-up),
# TORCH_CUDA_ARCH_LIST (default: this GPU's), CUDA_HOME (when the nvcc on PATH is a wrapper script).
set -u -o pipefail

usage() {
    sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

OUT=""
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$OUT" ]; then
                echo "gpu_check.sh: one OUT_DIR only (got '$OUT' and '$arg')" >&2; exit 2
            fi
            OUT="$arg" ;;
    esac
done
if [ -z "$OUT" ]; then
    echo "gpu_check.sh: missing OUT_DIR" >&2
    usage >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CAP="${GPU_CHECK_CAP_S:-465}"
case "$CAP" in ''|*[!0-9]*) echo "gpu_check.sh: GPU_CHECK_CAP_S must be a number of seconds" >&2; exit 2 ;; esac

# name | budget (s) | what. The foreground budgets must sum below the cap (checked below, and by CI's dry run);
# ext_build runs in the background under its own limit and costs the cap nothing but ext_wait.
PLAN="install|30|pip install --no-deps --no-build-isolation -e . (TAILLOR_NO_CUDA_EXT=1: no compile)
info|10|taillor info --json
tests|155|pytest -m gpu on the Triton ops' test files (compiled Triton kernels vs the float64 oracle)
speed|110|taillor bench --device cuda --suites adapter --speed-target (bf16, T=8192, 4096x4096, r=16; linear, peft, eager, fused, split)
ext_wait|20|wait for the background extension build (python setup.py build_ext --inplace, limit 300 s)
ext_tests|35|pytest -m gpu tests/test_cuda_extension.py tests/test_randomized_svd.py
frames|85|taillor bench --device cuda --suites frames (Llama-7B shapes: 224 matrices, head 256)
report|10|write RESULTS.md and gpu-check.tar.gz"
EXT_BUILD_LIMIT=300
SUM=0
while IFS='|' read -r _ budget _; do SUM=$((SUM + budget)); done <<< "$PLAN"

echo "gpu_check.sh: repo $REPO, output $OUT, python $PY"
echo "plan (stage | budget s | command), in order; the extension build runs in the background from the install on:"
echo "$PLAN" | sed 's/^/  /'
echo "budgets sum to ${SUM}s; cap ${CAP}s"
if [ "$SUM" -ge "$CAP" ]; then
    echo "gpu_check.sh: the stage budgets (${SUM}s) do not fit under the cap (${CAP}s)" >&2
    exit 2
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY not found" >&2
    exit 2
fi
if ! bash -n "$0"; then
    echo "gpu_check.sh: syntax error in $0" >&2
    exit 2
fi
if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA GPU visible to torch: skipping the GPU stages (CPU-only machine); nothing to do."
    exit 0
fi
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh: --dry-run: a CUDA GPU is visible; the stages above would run. Nothing was run."
    exit 0
fi

START="$(date +%s)"
DEADLINE=$((START + CAP))
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET TAILLOR_BENCH_FAST TAILLOR_BENCH_FULL TAILLOR_BACKEND TAILLOR_ADAPTER_IMPL
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)"
    export TORCH_CUDA_ARCH_LIST
fi

budget_of() {  # the plan's budget of stage $1 (one source for the plan, the dry run and the run)
    echo "$PLAN" | awk -F'|' -v stage="$1" '$1 == stage {print $2}'
}

# run_stage NAME CMD...: runs CMD in the repo under timeout, logs to WORK/NAME.log, records the outcome.
run_stage() {
    local name="$1" budget; budget="$(budget_of "$1")"; shift
    local left=$((DEADLINE - $(date +%s)))
    local limit=$(( budget < left ? budget : left ))
    if [ "$limit" -lt 5 ]; then
        printf '%s\tskipped (out of time)\t0\n' "$name" >> "$STAGES"
        echo "== $name: skipped, ${left}s left"
        return 0
    fi
    echo "== $name (limit ${limit}s)"
    local t0; t0="$(date +%s)"
    # SIGINT first: pytest then still writes its JUnit XML of the tests that ran, and `taillor bench` keeps the
    # rows it measured (it writes its JSON after every case).
    (cd "$REPO" && timeout -s INT --kill-after=10 "$limit" "$@") > "$WORK/$name.log" 2>&1
    local rc=$? took=$(( $(date +%s) - t0 )) status="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ]; then status="timed out after ${limit}s"
    elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$STAGES"
    echo "   $status in ${took}s"
    tail -n 3 "$WORK/$name.log" | sed 's/^/   | /'
}

run_stage install env TAILLOR_NO_CUDA_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
(cd "$REPO" && exec nice -n 10 env MAX_JOBS=4 timeout "$EXT_BUILD_LIMIT" "$PY" setup.py -q build_ext --inplace) \
    > "$WORK/ext_build.log" 2>&1 &
EXT_PID=$!
EXT_T0="$(date +%s)"
run_stage info "$PY" -m taillor.cli info --json
run_stage tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_tail_adapter.py \
    tests/test_spectral_projection.py tests/test_spectral_penalty.py tests/test_kernel_launch.py \
    --junitxml="$WORK/tests.xml"
run_stage speed "$PY" -m taillor.cli bench --device cuda --suites adapter --speed-target --no-progress \
    --methods linear,peft,taillor-eager,taillor-fused,taillor-split --out "$WORK/speed.json"
run_stage ext_wait bash -c "while kill -0 $EXT_PID 2>/dev/null; do sleep 1; done"
kill "$EXT_PID" 2>/dev/null  # still building after its wait: stop it (reported as failed), leave nothing running
wait "$EXT_PID" 2>/dev/null
EXT_RC=$?
printf 'ext_build\t%s\t%s\n' "$([ "$EXT_RC" = 0 ] && echo ok || echo "failed (exit $EXT_RC)")" \
    "$(( $(date +%s) - EXT_T0 ))" >> "$STAGES"
if [ "$EXT_RC" = 0 ] && (cd /tmp && "$PY" -c "import taillor._C" >/dev/null 2>&1); then
    run_stage ext_tests env TAILLOR_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_cuda_extension.py tests/test_randomized_svd.py --junitxml="$WORK/ext_tests.xml"
else
    printf 'ext_tests\tskipped (extension not built, see ext_build.log)\t0\n' >> "$STAGES"
fi
run_stage frames "$PY" -m taillor.cli bench --device cuda --suites frames --no-progress --out "$WORK/frames.json"

# ---- report: RESULTS.md + one tarball, nothing else in OUT_DIR ------------------------------------------------
GPU_INFO="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
(cd "$REPO" && timeout 10 "$PY" benchmarks/gpu_check_report.py "$WORK" "$OUT/RESULTS.md" "$GPU_INFO" "$START" \
    "$CAP") > "$WORK/report.log" 2>&1 || echo "gpu_check.sh: report failed, see report.log in the tarball"
tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" .
rm -rf "$WORK"
echo "gpu_check.sh: done in $(( $(date +%s) - START ))s; $OUT/RESULTS.md and $OUT/gpu-check.tar.gz"
echo
cat "$OUT/RESULTS.md" 2>/dev/null
