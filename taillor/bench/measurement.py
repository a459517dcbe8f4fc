"""The measurements: every method of a comparison timed in the same run, interleaved round by round (the order
rotates every round), and summarized by the median of per-round values, so that a loaded machine slows every
method alike. One function per suite, each returning table rows (dicts):

* adapter: forward (training mode, autograd on), backward (input grad + adapter grads) and both; "× floor" is the
  median over rounds of the per-round ratio to the frozen nn.Linear, "× PEFT" the same against PEFT LoRA.
* svd: time and top-k singular-value error of taillor.randomized_svd, torch.svd_lowrank (same sketch) and
  torch.linalg.svd.
* penalty: the Gram form against materializing ΔW (forward + backward).
* frames: taillor.build_frames (head mode) over every target layer of a Llama-shaped model against a loop of
  torch.svd_lowrank (same sketch) and torch.linalg.svd (one layer, scaled to all layers).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..frame import clear_frame_cache
from .methods import METHOD_LABELS, METHODS, build_adapter_methods, check_outputs
from .metrics import max_principal_angle, median, sigma_rel_error, sync, time_call
from .shapes import AdapterShape, FramesModel, PenaltyCase, SvdCase
from .spectral_methods import SVD_LABELS, FramesBench, penalty_functions, spectrum_matrix, svd_functions


def measure_adapter(shape: AdapterShape, device: torch.device, methods: Iterable[str] = METHODS,
                    warmup: int = 2, rounds: int = 7, tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Interleaved fwd/bwd timings of every method on one shape; one row per method (see module docstring)."""
    cases, skipped, x, dy = build_adapter_methods(shape, device, methods)
    keys = list(cases)
    errors: dict[str, str] = {}
    for key in keys:  # warm-up (and torch.compile's compilation) outside the measurement
        try:
            for _ in range(max(warmup, 1 if key == "taillor-compile" else 0)):
                cases[key].step(x, dy, device)
        except Exception as err:  # noqa: BLE001 - one broken method must not hide the others
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    keys = [k for k in keys if k not in errors]
    checks = check_outputs(cases, keys, x, dy, device, shape.torch_dtype)
    if tick:
        tick(len(errors))
    fwd: dict[str, list[float]] = {k: [] for k in keys}
    bwd: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(rounds):
        order = keys[i % len(keys):] + keys[:i % len(keys)] if keys else []
        for key in order:
            f, b = cases[key].step(x, dy, device)
            fwd[key].append(f)
            bwd[key].append(b)
            if tick:
                tick(0)
    rows = []
    floor = "linear" if "linear" in keys else None
    for key in [m for m in METHODS if m in cases or m in skipped]:
        row = {"suite": "adapter", "shape": shape.name, **asdict(shape), "device": device.type, "method": key,
               "label": METHOD_LABELS[key], "rounds": rounds}
        if key in skipped or key in errors:
            row["skipped"] = skipped.get(key) or errors[key]
            rows.append(row)
            continue
        both = [f + b for f, b in zip(fwd[key], bwd[key])]
        row.update(fwd_ms=1e3 * median(fwd[key]), bwd_ms=1e3 * median(bwd[key]), fwd_bwd_ms=1e3 * median(both))
        if floor:
            fboth = [f + b for f, b in zip(fwd[floor], bwd[floor])]
            row.update(ratio_fwd=median(a / b for a, b in zip(fwd[key], fwd[floor])),
                       ratio_bwd=median(a / b for a, b in zip(bwd[key], bwd[floor])),
                       ratio_fwd_bwd=median(a / b for a, b in zip(both, fboth)))
        if "peft" in keys:  # the peer, paired round by round like the floor
            pboth = [f + b for f, b in zip(fwd["peft"], bwd["peft"])]
            row["ratio_to_peft"] = median(a / b for a, b in zip(both, pboth))
        row["peak_mb"], row["memory_kind"] = cases[key].peak_mb(x, dy, device)
        if key in checks:
            row["check"] = checks[key]
        rows.append(row)
    return rows



def measure_svd(case: SvdCase, device: torch.device, warmup: int = 1, rounds: int = 5,
                tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Interleaved timings and top-k singular-value errors of the three SVDs; "× ref" is relative to svd_lowrank."""
    W, sigma = spectrum_matrix(case.m, case.n, case.decay, device=device)
    fns = svd_functions(case)
    times: dict[str, list[float]] = {k: [] for k in fns}
    last: dict[str, tuple[Tensor, Tensor]] = {}  # (S, V) of each method's last round (the methods are seeded)
    for key, fn in fns.items():
        for _ in range(warmup):
            fn(W)
    for i in range(rounds):
        keys = list(fns)
        for key in keys[i % 3:] + keys[:i % 3]:
            seconds, (_, S, V) = time_call(lambda: fns[key](W), device)
            times[key].append(seconds)
            last[key] = (S, V)
            if tick:
                tick(0)
    errors = {key: sigma_rel_error(S, sigma) for key, (S, _) in last.items()}
    # subspace agreement with the exact top-k right singular vectors
    angles = {key: max_principal_angle(V, last["linalg.svd"][1]) for key, (_, V) in last.items()}
    rows = []
    for key in fns:
        rows.append({"suite": "svd", "shape": case.name, **asdict(case), "device": device.type, "method": key,
                     "label": SVD_LABELS[key], "rounds": rounds, "ms": 1e3 * median(times[key]),
                     "ratio_to_svd_lowrank": median(a / b for a, b in zip(times[key], times["svd_lowrank"])),
                     "speedup_vs_linalg_svd": median(b / a for a, b in zip(times[key], times["linalg.svd"])),
                     "sigma_rel_error": errors[key], "max_angle_rad": angles[key]})
    return rows



def penalty_step(fn: Callable[[], Tensor], params: list, device: torch.device) -> tuple[float, float, float]:
    """One forward + backward of a penalty closure: (forward seconds, forward+backward seconds, value)."""
    for p in params:
        p.grad = None
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    t1 = time.perf_counter()
    value.backward()
    sync(device)
    return t1 - t0, time.perf_counter() - t0, float(value.detach())


def measure_penalty(case: PenaltyCase, device: torch.device, warmup: int = 1, rounds: int = 7,
                    tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    gram, naive, params = penalty_functions(case, device)
    fns = {"gram": gram, "naive": naive}
    fwd: dict[str, list[float]] = {k: [] for k in fns}
    both: dict[str, list[float]] = {k: [] for k in fns}
    values = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            penalty_step(fn, params, device)
    for i in range(rounds):
        for key in (("gram", "naive") if i % 2 == 0 else ("naive", "gram")):
            f, fb, values[key] = penalty_step(fns[key], params, device)
            fwd[key].append(f)
            both[key].append(fb)
            if tick:
                tick(0)
    labels = {"gram": "Gram form (taillor)", "naive": "naive (materialize ΔW)"}
    rows = []
    for key in fns:
        rows.append({"suite": "penalty", "shape": case.name, **asdict(case), "device": device.type, "method": key,
                     "label": labels[key], "rounds": rounds, "fwd_ms": 1e3 * median(fwd[key]),
                     "fwd_bwd_ms": 1e3 * median(both[key]),
                     "ratio_to_gram": median(a / b for a, b in zip(both[key], both["gram"])),
                     "value": values[key],
                     "rel_diff_to_naive": abs(values[key] - values["naive"]) / max(abs(values["naive"]), 1e-30)})
    return rows



def measure_frames(model: FramesModel, device: torch.device, rounds: int = 1,
                   tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    """build_frames vs a loop of torch.svd_lowrank vs torch.linalg.svd (one layer, times the layer count)."""
    bench = FramesBench(model, device)
    bench.warmup()
    times: dict[str, list[float]] = {"build_frames": [], "svd_lowrank": [], "linalg.svd": []}
    results = {}
    for i in range(rounds):
        for key in (("build_frames", "svd_lowrank") if i % 2 == 0 else ("svd_lowrank", "build_frames")):
            fn = bench.ours if key == "build_frames" else bench.lowrank
            seconds, results[key] = time_call(fn, device)
            times[key].append(seconds)
            if tick:
                tick(0)
    seconds, exact = time_call(bench.exact_layer0, device)
    times["linalg.svd"].append(seconds * model.layers)
    results["linalg.svd"] = exact
    if tick:
        tick(0)
    clear_frame_cache()
    labels = {"build_frames": "taillor.build_frames", "svd_lowrank": "loop of torch.svd_lowrank (same sketch)",
              "linalg.svd": f"torch.linalg.svd (1 layer x {model.layers})"}
    rows = []
    for key in times:
        sigma_err, angle = bench.errors(results[key], exact)
        rows.append({"suite": "frames", **bench.describe(), "method": key, "label": labels[key],
                     "rounds": len(times[key]), "s": median(times[key]),
                     "speedup_of_build_frames": median(times[key]) / median(times["build_frames"]),
                     "sigma_rel_error_layer0": sigma_err, "max_angle_rad_layer0": angle})
    return rows

