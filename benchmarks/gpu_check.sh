#!/usr/bin/env bash
# gpu_check.sh — everything that needs a GPU, in one go, on a lent GPU machine (torch and triton preinstalled,
# no network): install taillor without dependencies (building the CUDA extension), `taillor info`, the GPU tests
# (pytest -m gpu), the GPU benchmarks (taillor bench --device cuda and the pytest-benchmark suites with
# --benchmark-json), then OUT_DIR/RESULTS.md, ready to paste into benchmarks/RESULTS.md.
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
#   --dry-run   check this script's syntax and arguments, print the plan and whether a GPU is visible, run
#               nothing (exit 0; CI runs this on the CPU).
#
# Without a CUDA device it prints one line saying the GPU stages are skipped and exits 0 (CPU-only skip path).
# Every stage runs under `timeout`; the whole script stays within GPU_CHECK_BUDGET_S seconds (default 465,
# i.e. under 8 minutes): a stage gets min(its own budget, the time left), and a stage with under 15 s left is
# skipped and reported as such. Safe to rerun: the install is an editable reinstall (incremental build), the
# output folder is overwritten stage by stage, nothing else is written outside OUT_DIR but build/ and the
# package's own build artefacts.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, TORCH_CUDA_ARCH_LIST (default: the GPU's own
# compute capability, for a fast build), CUDA_HOME (when the nvcc on PATH is a wrapper script).
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
BUDGET="${GPU_CHECK_BUDGET_S:-465}"
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: GPU_CHECK_BUDGET_S must be a number of seconds" >&2; exit 2 ;; esac
START="$(date +%s)"
DEADLINE=$((START + BUDGET))

# name | budget (s) | what
PLAN="install|210|python -m pip install --no-deps --no-build-isolation -e . (builds taillor._C; log: logs/install.log)
info|30|taillor info --json
tests|90|pytest -m gpu -q tests (GPU tests only; the TRITON_INTERPRET tests are CPU tests and are not run here)
bench_adapter_quick|80|taillor bench --device cuda --quick --suites adapter (issue 4 shape + 2k tokens, every method)
bench_spectral|110|taillor bench --device cuda --suites svd,penalty,frames (Llama-7B frames: 224 matrices, h=256)
bench_adapter_grid|120|taillor bench --device cuda --suites adapter (4096/11008 shapes x 2k/8k tokens x r 8/16/64, no compile)
bench_pytest|75|TAILLOR_BENCH_QUICK=1 pytest benchmarks -m gpu -k 'not compile' --benchmark-json (acceptance shapes)
report|15|write OUT_DIR/RESULTS.md"

echo "gpu_check.sh: repo $REPO, output $OUT, budget ${BUDGET}s, python $PY"
echo "plan (stage | budget s | command):"
echo "$PLAN" | sed 's/^/  /'

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY not found" >&2
    exit 2
fi

# Self-check: the script parses.
if ! bash -n "$0"; then
    echo "gpu_check.sh: syntax error in $0" >&2
    exit 2
fi

gpu_visible() {
    timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

if ! gpu_visible; then
    echo "gpu_check.sh: no CUDA GPU visible to torch: skipping the GPU stages (CPU-only machine); nothing to do."
    exit 0
fi
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh: --dry-run: a CUDA GPU is visible; the stages above would run. Nothing was run."
    exit 0
fi

mkdir -p "$OUT/logs" "$OUT/bench"
OUT="$(cd "$OUT" && pwd)"
STAGES="$OUT/logs/stages.tsv"
: > "$STAGES"

# run_stage NAME BUDGET CMD...: runs CMD in the repo under timeout, logs to logs/NAME.log, records the outcome.
run_stage() {
    local name="$1" budget="$2"; shift 2
    local now left limit rc t0
    now="$(date +%s)"
    left=$((DEADLINE - now))
    limit=$(( budget < left ? budget : left ))
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped (out of time)\t0\n' "$name" >> "$STAGES"
        echo "== $name: skipped, ${left}s left"
        return 0
    fi
    echo "== $name (limit ${limit}s)"
    t0="$(date +%s)"
    (cd "$REPO" && timeout --kill-after=10 "$limit" "$@") > "$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    local status="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${limit}s"
    elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$STAGES"
    echo "   $status in ${took}s (log: logs/$name.log)"
    tail -n 3 "$OUT/logs/$name.log" | sed 's/^/   | /'
    return 0
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)"
    export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET TAILLOR_BENCH_FAST TAILLOR_BENCH_FULL
export TAILLOR_BACKEND="${TAILLOR_BACKEND:-auto}"

run_stage install 210 "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
if ! (cd /tmp && timeout 60 "$PY" -c "import taillor" >/dev/null 2>&1); then
    # The build failed: install without the extension so that the rest still runs (reported in RESULTS.md).
    run_stage install_no_ext 60 env TAILLOR_NO_CUDA_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation \
        --no-input -e .
fi
run_stage info 30 "$PY" -m taillor.cli info --json
run_stage tests 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --junitxml="$OUT/logs/tests.xml"
run_stage bench_adapter_quick 80 "$PY" -m taillor.cli bench --device cuda --quick --suites adapter --no-progress \
    --out "$OUT/bench/adapter-1-quick.json"
run_stage bench_spectral 110 "$PY" -m taillor.cli bench --device cuda --suites svd,penalty,frames --no-progress \
    --out "$OUT/bench/spectral.json"
run_stage bench_adapter_grid 120 "$PY" -m taillor.cli bench --device cuda --suites adapter --no-progress \
    --methods linear,peft,taillor-eager,taillor-fused,taillor-split,naive-xv --rounds 15 --out "$OUT/bench/adapter-2-grid.json"
run_stage bench_pytest 75 env TAILLOR_BENCH_QUICK=1 TAILLOR_BENCH_ROUNDS=10 "$PY" -m pytest benchmarks -m gpu -q \
    -k "not compile" -p no:cacheprovider --benchmark-json="$OUT/bench/pytest-benchmark.json" \
    --benchmark-columns=median,rounds

# ---- report ---------------------------------------------------------------------------------------------------
GPU_INFO="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
(cd "$REPO" && timeout 30 "$PY" - "$OUT" "$GPU_INFO" "$START" <<'PYEOF') > "$OUT/logs/report.log" 2>&1
import datetime, glob, json, os, re, sys, time
out, gpu_info, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = []
try:
    import torch
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as err:  # noqa: BLE001
    versions = {"torch": f"unavailable ({err})"}
try:
    import triton
    versions["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    versions["triton"] = "unavailable"
info = {}
try:
    text = open(os.path.join(out, "logs", "info.log")).read()
    info = json.loads(text[text.index("{"):text.rindex("}") + 1])
except Exception:  # noqa: BLE001
    pass
lines.append(f"## GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
lines.append(f"- GPU: {gpu_info or 'unknown'}")
lines.append(f"- torch {versions.get('torch')}, CUDA {versions.get('cuda')}, triton {versions.get('triton')}")
lines.append(f"- taillor CUDA extension: {info.get('cuda_extension', 'unknown')}; Triton kernels: "
             f"{info.get('triton_kernels', 'unknown')}")
lines.append(f"- command: `bash benchmarks/gpu_check.sh {out}`; wall time {int(time.time()) - start} s\n")
lines.append("| stage | status | seconds |\n|---|---|---|")
for row in open(os.path.join(out, "logs", "stages.tsv")).read().splitlines():
    name, status, took = (row.split("\t") + ["", ""])[:3]
    lines.append(f"| {name} | {status} | {took} |")
lines.append("")
try:
    tests_log = open(os.path.join(out, "logs", "tests.log")).read().strip().splitlines()
    summary = [l for l in tests_log if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", l)]
    lines.append(f"GPU tests (`pytest -m gpu`): {summary[-1].strip('= ') if summary else 'no summary'}\n")
except OSError:
    lines.append("GPU tests: not run\n")
from taillor.bench import acceptance_checks, format_checks, format_markdown
rows = []
for path in sorted(glob.glob(os.path.join(out, "bench", "*.json"))):
    if path.endswith("pytest-benchmark.json"):
        continue
    try:
        data = json.load(open(path))
    except Exception:  # noqa: BLE001
        continue
    rows += data.get("rows", [])
if rows:
    checks = acceptance_checks(rows)
    if checks:
        lines.append("### Acceptance\n")
        lines.append(format_checks(checks, markdown=True))
    lines.append(format_markdown(rows))
else:
    lines.append("No benchmark results (see logs/bench_*.log).\n")
try:
    bench = json.load(open(os.path.join(out, "bench", "pytest-benchmark.json")))
    lines.append("### pytest-benchmark suites (acceptance shapes, `-m gpu`)\n")
    lines.append("| benchmark | median ms | ratio (extra_info) |\n|---|---|---|")
    for b in bench.get("benchmarks", []):
        extra = b.get("extra_info", {})
        ratio = next((f"{k} = {v:.2f}" for k, v in extra.items() if k.startswith(("ratio", "speedup"))
                      and isinstance(v, (int, float))), "")
        lines.append(f"| {b['name']} | {1e3 * b['stats']['median']:.3f} | {ratio} |")
    lines.append("")
except (OSError, ValueError, KeyError):
    pass
open(os.path.join(out, "RESULTS.md"), "w").write("\n".join(lines) + "\n")
print("wrote", os.path.join(out, "RESULTS.md"))
PYEOF
echo "gpu_check.sh: done in $(( $(date +%s) - START ))s; report: $OUT/RESULTS.md"
cat "$OUT/logs/report.log"
