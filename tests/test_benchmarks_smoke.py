"""The benchmarks must not rot: every pytest-benchmark suite runs once on toy shapes, ``taillor bench`` writes its
JSON with the rows and ratios, and benchmarks/gpu_check.sh passes its dry run on this (CPU-only) machine.

Fast mode (TAILLOR_BENCH_FAST=1) shrinks every case to toy sizes and one round; the numbers mean nothing, the
point is that every code path runs. One torch thread: on a loaded 2-core CI box it avoids stalls in tiny ops.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAILLOR_BENCH", "TRITON_INTERPRET"))}
    env.pop("TAILLOR_BACKEND", None)
    env.update(TAILLOR_BENCH_FAST="1", TAILLOR_BENCH_THREADS="1", **extra)
    return env


def test_benchmark_suites_run_once(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "--bench-fast", f"--benchmark-json={out}", "--benchmark-disable-gc"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    full_names = [b["fullname"] for b in data["benchmarks"]]
    assert len(full_names) == len(set(full_names)), "a benchmark ran twice"
    names = {b["name"].split("[")[0] for b in data["benchmarks"]}
    assert names == {"test_tail_adapter", "test_randomized_svd", "test_spectral_penalty", "test_build_frames"}
    ratio_keys = {"test_tail_adapter": "ratio_to_floor", "test_randomized_svd": "ratio_to_svd_lowrank",
                  "test_spectral_penalty": "ratio_to_gram", "test_build_frames": "speedup_vs_svd_lowrank"}
    methods = set()
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        value = extra[ratio_keys[bench["name"].split("[")[0]]]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (bench["name"], extra)
        if bench["name"].startswith("test_tail_adapter"):
            methods.add(extra["method"])
            assert extra["phase"] in ("fwd", "bwd", "fwd+bwd")
            assert extra["peak_mb"] is None or extra["peak_mb"] >= 0
    assert {"linear", "peft", "taillor-eager", "taillor-compile", "naive-xv"} <= methods


def test_taillor_bench_command_writes_json(tmp_path, monkeypatch):
    from taillor.cli import main
    monkeypatch.setenv("TAILLOR_BENCH_FAST", "1")
    monkeypatch.delenv("TAILLOR_BACKEND", raising=False)
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--threads", "1",
                   "--methods", "linear,peft,taillor-eager,naive-xv"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["fast_mode"] is True
    adapter = {r["method"]: r for r in data["rows"] if r["suite"] == "adapter"}
    assert {"linear", "peft", "taillor-eager", "naive-xv"} <= set(adapter)
    for row in adapter.values():
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "ratio_fwd", "ratio_bwd", "ratio_fwd_bwd"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
    assert adapter["linear"]["ratio_fwd_bwd"] == pytest.approx(1.0)
    suites = {r["suite"] for r in data["rows"]}
    assert suites == {"adapter", "svd", "penalty", "frames"}
    for row in data["rows"]:
        if row["suite"] == "svd":
            assert row["sigma_rel_error"] < 0.5 and row["ratio_to_svd_lowrank"] > 0
        if row["suite"] == "penalty":
            assert row["rel_diff_to_naive"] < 1e-4 and row["ratio_to_gram"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "PEFT LoRA" in md and "nn.Linear" in md and "TailLoRLinear eager" in md


def test_taillor_bench_rejects_bad_arguments(tmp_path, capsys):
    from taillor.bench import main
    assert main(["--suites", "nope", "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "bench.json").exists()


def test_gpu_check_dry_run(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = _env(PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan" in proc.stdout and "pytest -m gpu" in proc.stdout
    if torch.cuda.is_available():
        assert "Nothing was run" in proc.stdout
    else:
        assert "skipping the GPU stages" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    for bad in ([], ["a", "b"], ["--bogus", "x"]):
        proc = subprocess.run(["bash", str(script), *bad], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
