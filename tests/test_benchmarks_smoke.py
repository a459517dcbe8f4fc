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

from conftest import TOLERANCE

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAILLOR_BENCH", "TRITON_INTERPRET"))}
    env.pop("TAILLOR_BACKEND", None)
    env.update(TAILLOR_BENCH_FAST="1", TAILLOR_BENCH_THREADS="1", **extra)
    return env


@pytest.mark.slow  # every benchmark suite once, in a pytest subprocess
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
    assert names == {"test_tail_adapter", "test_spectral_projection", "test_randomized_svd", "test_spectral_penalty",
                     "test_adaptive_strength_penalty", "test_build_frames"}
    ratio_keys = {"test_tail_adapter": "ratio_to_floor", "test_spectral_projection": "ratio_to_matmul",
                  "test_randomized_svd": "ratio_to_svd_lowrank", "test_spectral_penalty": "ratio_to_gram",
                  "test_adaptive_strength_penalty": "ratio_to_fixed", "test_build_frames": "speedup_vs_svd_lowrank"}
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
    by_frame = {frame: {r["method"]: r for r in data["rows"] if r["suite"] == "adapter" and r["frame"] == frame}
                for frame in ("head", "full")}
    # The speed target runs in both frames; the naive x·V adapter exists in the full frame only.
    assert set(by_frame["head"]) == set(by_frame["full"]) == {"linear", "peft", "taillor-eager", "naive-xv"}
    assert by_frame["head"]["naive-xv"]["skipped"].startswith("the naive x·V adapter projects through the full")
    adapter = by_frame["full"]
    timed = [r for rows in by_frame.values() for r in rows.values() if "skipped" not in r]
    assert len(timed) == 7 and all(r["frame"] in r["shape"] for r in timed)
    for row in timed:
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "ratio_fwd", "ratio_bwd", "ratio_fwd_bwd"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
    assert adapter["linear"]["ratio_fwd_bwd"] == pytest.approx(1.0)
    # Every timed TailLoR-family output is compared with the eager TailLoRLinear's (a mismatch would say FAILED).
    assert adapter["naive-xv"]["check"].startswith("ok (max diff to eager: y ")
    assert "check" not in adapter["linear"] and "check" not in adapter["peft"]
    suites = {r["suite"] for r in data["rows"]}
    assert suites == {"adapter", "svd", "penalty", "frames"}
    for row in data["rows"]:
        if row["suite"] == "svd":
            assert row["sigma_rel_error"] < 0.5 and row["ratio_to_svd_lowrank"] > 0
        if row["suite"] == "penalty":
            # the bench's own check: its Gram-form penalty against the naive one, both float32, relative
            assert row["rel_diff_to_naive"] < TOLERANCE["reordered product"][1] and row["ratio_to_gram"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "PEFT LoRA" in md and "nn.Linear" in md and "TailLoRLinear eager" in md


@pytest.mark.parametrize("frame", ["head", "full"])
def test_adapter_bench_times_the_shapes_frame(frame):
    """The TailLoR rows of a shape time a layer in that shape's frame (the head frame is the library's default)."""
    from taillor.bench.methods import build_adapter_methods
    from taillor.bench.shapes import AdapterShape
    cases, skipped, _, _ = build_adapter_methods(AdapterShape(32, 16, 12, 4, frame=frame), torch.device("cpu"),
                                                 ("linear", "taillor-eager", "naive-xv"))
    assert cases["taillor-eager"].module.config.frame == frame
    assert ("naive-xv" in skipped) == (frame == "head") and ("naive-xv" in cases) == (frame == "full")


def test_taillor_bench_rejects_bad_arguments(tmp_path, capsys):
    from taillor.bench import main
    assert main(["--suites", "nope", "--out", str(tmp_path)]) == 2
    for option, bad in (("--memory-shapes", "llama-7b"), ("--memory-bases", "int3"), ("--memory-methods", "")):
        assert main(["--suites", "memory", option, bad, "--out", str(tmp_path)]) == 2
        assert f"unknown memory {option.split('-')[-1][:-1]}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "bench.json").exists()


def test_match_tolerance_is_twice_the_suite_tolerance():
    from taillor.bench.methods import MATCH_TOLERANCE
    for dtype, tol in MATCH_TOLERANCE.items():
        assert tol == pytest.approx(2 * TOLERANCE["oracle"][dtype])


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("YES", True), ("", False), ("0", False),
                                       ("false", False), ("False", False), ("no", False), ("off", False)])
def test_bench_switches_read_false_and_zero_as_off(monkeypatch, value, on):
    from taillor.bench.shapes import fast_mode, full_mode, quick_mode
    for name, read in (("TAILLOR_BENCH_FAST", fast_mode), ("TAILLOR_BENCH_QUICK", quick_mode),
                       ("TAILLOR_BENCH_FULL", full_mode)):
        monkeypatch.setenv(name, value)
        assert read() is on, (name, value)
        monkeypatch.delenv(name)
        assert read() is False, name


def test_registry_rounds_honour_quick(monkeypatch):
    """The pytest suites' round counts follow TAILLOR_BENCH_QUICK as `taillor bench --quick` does (fewer on CUDA)."""
    from taillor.bench.shapes import rounds_for
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import registry
    finally:
        sys.path.pop(0)
    for var in ("TAILLOR_BENCH_FAST", "TAILLOR_BENCH_ROUNDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TAILLOR_BENCH_QUICK", "1")
    assert registry.rounds("cuda") == rounds_for("cuda", quick=True) != rounds_for("cuda", quick=False)
    monkeypatch.setenv("TAILLOR_BENCH_QUICK", "false")
    assert registry.rounds("cuda") == rounds_for("cuda", quick=False)


def test_frames_bench_counts_the_exact_svds_build_frames_makes(monkeypatch):
    """The frames table's "exact SVD" count comes from the rule build_frames applies, not a copy of it: count the
    matrices build_frames hands to torch.linalg.svd on a model mixing both paths."""
    from taillor.bench.shapes import FramesModel
    from taillor.bench.spectral_methods import FramesBench
    monkeypatch.delenv("TAILLOR_BENCH_FAST", raising=False)
    bench = FramesBench(FramesModel("tiny", 2, 128, 384, 64, 16), torch.device("cpu"))
    shapes = {tuple(W.shape) for W in bench.weights.values()}
    decomposed = []  # weights given to the exact SVD (the randomized path's small SVDs are l×l, not weight-shaped)
    real_svd = torch.linalg.svd

    def counting_svd(W, *args, **kwargs):
        if tuple(W.shape[-2:]) in shapes or tuple(W.shape[-2:])[::-1] in shapes:  # wide weights: their transpose
            decomposed.append(W.shape[0] if W.dim() == 3 else 1)
        return real_svd(W, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    bench.ours()
    assert 0 < bench.n_exact < len(bench.weights)
    assert sum(decomposed) == bench.n_exact


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the memory suite reads Linux /proc")
@pytest.mark.parametrize("base", ["nf4", "bf16"])
def test_memory_probe_runs_and_its_estimate_counts_the_frames(base):
    """One memory case in this process on the toy shape (the suite runs each case in a fresh process; the numbers
    of a toy mean nothing): the phases are measured, the estimate's frame bytes are the frames the model got
    (bfloat16 frames on a bfloat16 base)."""
    if base == "nf4":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install taillor[quant])")
    pytest.importorskip("transformers", reason="transformers is not installed")
    from taillor.bench.memory import llama_model, memory_table, probe
    import taillor
    row = probe("toy", base, "taillor-full")
    assert row["apply_kept"] >= 0 and row["apply_peak"] >= row["apply_kept"] and row["step_peak"] > 0
    config = taillor.TailLoRConfig(rank=8, alpha=16, target_modules="all-linear", frame="full", head=0.25)
    model = llama_model("toy", base)
    estimate = taillor.estimate_apply_memory(model, config)
    taillor.apply_taillor(model, config, progress=False)
    frames = sum(sum(t.numel() * t.element_size() for t in (l.frame.U, l.frame.S, l.frame.V, l.frame.omega2))
                 for _, l in taillor.iter_taillor_layers(model))
    factors = sum(t.numel() * t.element_size() for _, l in taillor.iter_taillor_layers(model)
                  for t in (l.lora_A, l.lora_B, l.strength_seen))
    assert estimate["frames"] == row["estimate"]["frames"] == frames and estimate["factors"] == factors
    assert {l.frame.U.dtype for _, l in taillor.iter_taillor_layers(model)} == {
        torch.bfloat16 if base == "bf16" else torch.float32}
    header, lines = memory_table([row])
    assert len(lines) == 1 and len(lines[0]) == len(header)
