#!/usr/bin/env bash
# gpu_check.sh — one short run on a lent GPU machine that settles every GPU question of taillor and ends with a
# verdict table. Made for a fresh machine with torch, triton, pytest-xdist and Python preinstalled and no network.
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
#   --dry-run   print the plan: each stage's limit, its number of Triton compiles (from the call-site records of
#               taillor check-kernels), its tests (pytest's collection) and its estimated time on GPU_CHECK_CORES
#               cores, and the total against the 8-minute goal; needs no GPU, runs nothing on one, writes nothing
#               (exit 1 when the plan does not fit; CI runs it on the CPU).
#
# Stages, in this order (each under `timeout`, given min(its limit, the time left before the cap); the limits live
# in benchmarks/gpu_check_plan.py):
#   install      pip install --no-deps --no-build-isolation -e . without the CUDA extension (seconds)
#   ext_build    starts in the background right after the install: builds taillor._C for this GPU's arch with
#                TAILLOR_REQUIRE_CUDA_EXT=1 (a compile error fails it) on idle cores while the GPU stages run
#   info         taillor info --json
#   tests        pytest -n CORES -m gpu tests/ (all but the extension's files): compiled kernels vs float64
#   speed        bf16, 8192 tokens, 4096x4096, r=16, in the head frame (the default) and in the full frame:
#                nn.Linear, PEFT LoRA, TailLoRLinear eager and every Triton route, timed with CUDA events
#                (fwd+bwd together, many steps per round); outputs checked vs eager
#   ext_wait     waits for ext_build; it counts as built only if `taillor info` then says cuda_extension=built
#   ext_tests    pytest -n CORES -m gpu tests/test_cuda_extension.py tests/test_randomized_svd.py
#   frames       taillor bench --suites frames: build_frames on a Llama-7B-shaped model (224 matrices, head 256),
#                rows written as they are measured
#   report       OUT_DIR/RESULTS.md (also printed), ending with the verdict table of every GPU goal
#
# Every TAILLOR_* variable (and TRITON_INTERPRET) is cleared first: an inherited setting must not change a stage.
# A stage that timed out, or ran fewer tests than it collected, is "not measured" in the verdict, never "met".
# Output: exactly two files, OUT_DIR/RESULTS.md and OUT_DIR/gpu-check.tar.gz (every log, the JUnit XML of the
# tests and the benchmark JSON), so that a remote machine can return it (at most 8 files, 2 folders deep).
# Environment: PYTHON (default python3), GPU_CHECK_CORES (default: nproc, 16 for the dry run), TORCH_CUDA_ARCH_LIST
# (default: this GPU's), CUDA_HOME (when the nvcc on PATH is a wrapper script).
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
CLEARED=""
for var in $(compgen -e | grep -E '^(TAILLOR_|TRITON_INTERPRET$)'); do unset "$var"; CLEARED="$CLEARED $var"; done
[ -n "$CLEARED" ] && echo "gpu_check.sh: cleared inherited settings:$CLEARED"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY not found" >&2
    exit 2
fi
if ! bash -n "$0"; then
    echo "gpu_check.sh: syntax error in $0" >&2
    exit 2
fi
PLAN="$(cd "$REPO" && "$PY" benchmarks/gpu_check_plan.py --limits)" || { echo "gpu_check.sh: no plan" >&2; exit 2; }
CAP="$(echo "$PLAN" | awk -F'|' '$1 == "cap" {print $2}')"
EXT_BUILD_LIMIT=300

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh: --dry-run: repo $REPO, output $OUT, python $PY; nothing is run on a GPU"
    (cd "$REPO" && "$PY" benchmarks/gpu_check_plan.py --estimate "${GPU_CHECK_CORES:-16}")
    exit $?
fi
if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA GPU visible to torch: nothing to measure (CPU-only machine)."
    exit 0
fi
CORES="${GPU_CHECK_CORES:-$(nproc)}"
echo "gpu_check.sh: repo $REPO, output $OUT, python $PY, $CORES cores, cap ${CAP}s"

START="$(date +%s)"
DEADLINE=$((START + CAP))
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A cold Triton cache of this run's own, outside WORK (it does not go into the tarball).
TRITON_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-triton.XXXXXX")"
export TRITON_CACHE_DIR
XDIST=""
if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n $CORES"; else
    echo "gpu_check.sh: pytest-xdist is missing: the tests run one after another (the plan assumes $CORES workers)"
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)"
    export TORCH_CUDA_ARCH_LIST
fi

limit_of() {  # the plan's limit of stage $1 (benchmarks/gpu_check_plan.py: one source for the run and the dry run)
    echo "$PLAN" | awk -F'|' -v stage="$1" '$1 == stage {print $2}'
}

# run_stage NAME CMD...: runs CMD in the repo under timeout, logs to WORK/NAME.log, records the outcome.
run_stage() {
    local name="$1" budget; budget="$(limit_of "$1")"; shift
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
(cd "$REPO" && exec nice -n 10 env MAX_JOBS=4 TAILLOR_REQUIRE_CUDA_EXT=1 timeout "$EXT_BUILD_LIMIT" "$PY" setup.py \
    -q build_ext --inplace) > "$WORK/ext_build.log" 2>&1 &
EXT_PID=$!
EXT_T0="$(date +%s)"
run_stage info "$PY" -m taillor.cli info --json
# shellcheck disable=SC2086  # XDIST is "-n CORES" or empty
run_stage tests "$PY" -m pytest $XDIST -m gpu -p no:cacheprovider -rfEs tests \
    --ignore=tests/test_cuda_extension.py --ignore=tests/test_randomized_svd.py --junitxml="$WORK/tests.xml"
ROUTES="$(cd "$REPO" && "$PY" -c "from taillor.bench.methods import ROUTE_METHODS; print(','.join(ROUTE_METHODS))")"
run_stage speed "$PY" -m taillor.cli bench --device cuda --suites adapter --speed-target --no-progress \
    --methods "linear,peft,taillor-eager,$ROUTES" --out "$WORK/speed.json"
run_stage ext_wait bash -c "while kill -0 $EXT_PID 2>/dev/null; do sleep 1; done"
kill "$EXT_PID" 2>/dev/null  # still building after its wait: stop it (reported as failed), leave nothing running
wait "$EXT_PID" 2>/dev/null
EXT_RC=$?
(cd "$REPO" && timeout 60 "$PY" -m taillor.cli info --json) > "$WORK/ext_info.log" 2>&1
if [ "$EXT_RC" != 0 ]; then EXT_STATUS="failed (exit $EXT_RC)"
elif ! grep -q '"cuda_extension": "built"' "$WORK/ext_info.log"; then EXT_STATUS="failed (built, but taillor info does not load it)"
else EXT_STATUS="ok"; fi
printf 'ext_build\t%s\t%s\n' "$EXT_STATUS" "$(( $(date +%s) - EXT_T0 ))" >> "$STAGES"
if [ "$EXT_STATUS" = ok ]; then
    # shellcheck disable=SC2086
    run_stage ext_tests env TAILLOR_REQUIRE_CUDA_EXT=1 "$PY" -m pytest $XDIST -m gpu -p no:cacheprovider -rfEs \
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
rm -rf "$WORK" "$TRITON_CACHE_DIR"
echo "gpu_check.sh: done in $(( $(date +%s) - START ))s; $OUT/RESULTS.md and $OUT/gpu-check.tar.gz"
echo
cat "$OUT/RESULTS.md" 2>/dev/null
