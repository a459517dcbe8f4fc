"""The plan of benchmarks/gpu_check.sh: its stages and their time limits (one source for the script and its dry
run), and the dry run's estimate of each stage on the GPU machine, derived from the project's own records.

usage: python benchmarks/gpu_check_plan.py --limits              stage|limit s|what, one line per stage
       python benchmarks/gpu_check_plan.py --estimate [CORES]    the table of the dry run (default 16 cores);
                                                                 exit 1 when an estimate exceeds its limit or
                                                                 the total exceeds TOTAL_GOAL_S

Estimate of a stage = its fixed cost (BASE_S: start-up, data, the measurement itself; planning figures, not
measurements) + its tests x TEST_S / cores + its Triton compiles x COMPILE_S / (cores when the compiles run in
parallel, else 1).
* Compiles come from ``taillor.check_kernels.specializations()``: every distinct specialization of every Triton
  launch the ops make at run time (recorded on meta tensors by taillor/kernel_call_sites.py), times the configs
  its launch site tunes over (each config is a compile of its own). The tests stage may compile any of them (the
  every-config tests compile all), in parallel across the pytest-xdist workers. The speed stage compiles the bf16
  adapter sites at a token count divisible by 16 and the projection into bf16, one config after another (the
  tuner benchmarks each config in one process); a Triton cache warm from the tests stage only makes it faster.
* Tests come from pytest's own collection of the stage's ``-m gpu`` tests (run on this machine, no GPU needed).
"""
from __future__ import annotations

import re
import subprocess
import sys

CAP_S = 470          # the script's cap; the limits below sum to less
TOTAL_GOAL_S = 480   # the whole check, start-up included: 8 minutes
# CPU seconds of one cold Triton compile (frontend, MLIR passes, ptxas for sm_90): 0.9-1.1 s measured as the
# process CPU time of `taillor check-kernels --arch sm_90 --jobs 1 --only penalty` (8 compiles) and
# `--only "fused forward"` minus that of a run compiling nothing, on a 2-core VM shared with other jobs
# (2026-12-03, load 13-19); rounded up.
COMPILE_S = 1.2
TEST_S = 0.5         # seconds a GPU test runs once its kernels are compiled (planning figure)
EXT_TESTS = ("tests/test_cuda_extension.py", "tests/test_randomized_svd.py")

# name | limit (s) | fixed cost (s) | what. The speed stage's fixed cost covers two frames' set-up and timing.
STAGES = (
    ("install", 30, 20, "pip install --no-deps --no-build-isolation -e . (TAILLOR_NO_CUDA_EXT=1: no compile)"),
    ("info", 15, 8, "taillor info --json"),
    ("tests", 90, 25, "pytest -n CORES -m gpu tests (all but the extension's; compiled kernels vs float64)"),
    ("speed", 150, 50, "taillor bench --device cuda --suites adapter --speed-target (bf16, T=8192, 4096x4096, "
                       "r=16, head and full frame; nn.Linear, PEFT, eager, every Triton route; CUDA events, "
                       "fwd+bwd together)"),
    ("ext_wait", 40, 10, "wait for the background build (setup.py build_ext, TAILLOR_REQUIRE_CUDA_EXT=1), then "
                         "taillor info must say cuda_extension=built"),
    ("ext_tests", 50, 20, "pytest -n CORES -m gpu " + " ".join(EXT_TESTS)),
    ("frames", 80, 45, "taillor bench --device cuda --suites frames (Llama-7B shapes: 224 matrices, head 256; "
                       "linalg.svd and svd_lowrank on one layer, scaled)"),
    ("report", 10, 3, "write RESULTS.md and gpu-check.tar.gz"),
)
PARALLEL_COMPILES = {"tests": True, "speed": False}


def compiles_per_stage() -> dict[str, int]:
    """{stage: Triton compiles} from the call-site records (see the module docstring)."""
    from taillor.check_kernels import specializations

    total = speed = 0
    for entry in specializations():
        n = max(1, len(entry["configs"] or ()))
        total += n
        label = entry["dtype"]
        if label.startswith("bf16 T%16") or label == "fp32 -> bf16":
            speed += n
    return {"tests": total, "speed": speed}


def collected_tests() -> dict[str, int]:
    """{"tests": n, "ext_tests": n}: how many ``-m gpu`` tests pytest collects for each stage (one collection)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                          "no:cacheprovider", "tests"], capture_output=True, text=True, timeout=300)
    ids = [line.split("::")[0] for line in out.stdout.splitlines() if "::" in line]
    if not ids and not re.search(r"\d+(?:/\d+)? tests? collected", out.stdout):
        raise RuntimeError(f"pytest did not report its collection: {out.stdout[-500:]}{out.stderr[-500:]}")
    ext = sum(1 for path in ids if path in EXT_TESTS)
    return {"tests": len(ids) - ext, "ext_tests": ext}


def estimate(cores: int) -> list[dict]:
    """One dict per stage: name, limit, compiles, tests, est (seconds), what."""
    compiles = compiles_per_stage()
    tests = collected_tests()
    rows = []
    for name, limit, base, what in STAGES:
        n_compiles, n_tests = compiles.get(name, 0), tests.get(name, 0)
        parallel = cores if PARALLEL_COMPILES.get(name, False) else 1
        seconds = base + n_tests * TEST_S / cores + n_compiles * COMPILE_S / parallel
        rows.append({"name": name, "limit": limit, "compiles": n_compiles, "tests": n_tests, "est": seconds,
                     "what": what})
    return rows


def print_plan(cores: int) -> int:
    rows = estimate(cores)
    print(f"{'stage':<10} {'limit s':>7} {'compiles':>8} {'tests':>5} {'est. s':>6}  what "
          f"(estimate on {cores} cores; {COMPILE_S} s per compile, {TEST_S} s per test)")
    for r in rows:
        print(f"{r['name']:<10} {r['limit']:>7} {r['compiles']:>8} {r['tests']:>5} {r['est']:>6.0f}  {r['what']}")
    total = sum(r["est"] for r in rows)
    limits = sum(r["limit"] for r in rows)
    print(f"total: estimated {total:.0f} s, limits {limits} s, cap {CAP_S} s, goal {TOTAL_GOAL_S} s (8 min)")
    over = [r["name"] for r in rows if r["est"] > r["limit"]]
    if over or total > TOTAL_GOAL_S or limits >= CAP_S:
        print(f"gpu_check_plan: does not fit: stages over their limit {over}, total {total:.0f} s "
              f"(goal {TOTAL_GOAL_S} s), limits {limits} s (cap {CAP_S} s)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--limits"]:
        for name, limit, _, what in STAGES:
            print(f"{name}|{limit}|{what}")
        print(f"cap|{CAP_S}|the whole check")
        return 0
    if argv[:1] == ["--estimate"]:
        cores = int(argv[1]) if len(argv) > 1 else 16
        if cores < 1:
            print("gpu_check_plan: CORES must be >= 1", file=sys.stderr)
            return 2
        return print_plan(cores)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
