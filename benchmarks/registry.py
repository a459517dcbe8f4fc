"""The benchmark registry, seen from the pytest-benchmark suites.

The shapes and cases live in :mod:`taillor.bench.shapes` (one place), because ``taillor bench`` has to work from an
installed package, where this folder does not exist. This module turns them into pytest parameters: CPU cases
always, CUDA cases (marked ``gpu``) only when torch sees a CUDA device. Under ``TAILLOR_BENCH_FAST=1`` (or
``pytest benchmarks --bench-fast``) every case is a toy one run once (CI). ``TAILLOR_BENCH_QUICK=1`` keeps the
speed-target cases only, with fewer rounds on CUDA. ``TAILLOR_BENCH_FULL=1`` runs the frames suite on all 16 layers
of the 1B shapes on the CPU (slow). Each switch is off when unset or "0", "false", "no", "off".
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.methods import METHODS
from taillor.bench.spectral_methods import SVD_METHODS
from taillor.bench.shapes import (adapter_shapes, frames_models, full_mode, penalty_cases, projection_cases,
                                  quick_mode, rounds_for, svd_cases)

PHASES = ("fwd", "bwd", "fwd+bwd")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _marks(device: str):
    return [pytest.mark.gpu] if device == "cuda" else []


def rounds(device: str) -> tuple[int, int]:
    """(warm-up, rounds) for one benchmark (fewer under TAILLOR_BENCH_QUICK); TAILLOR_BENCH_ROUNDS overrides
    rounds."""
    return rounds_for(device, quick_mode())


def adapter_params() -> list:
    """(shape, device, method, phase), ordered so that one shape's cases run together."""
    out = []
    for device in devices():
        for shape in adapter_shapes(device, quick_mode()):
            for method in METHODS:
                if method == "naive-xv" and shape.frame != "full":  # it projects through the full frame
                    continue
                for phase in PHASES:
                    out.append(pytest.param(shape, device, method, phase, marks=_marks(device),
                                            id=f"{device}-{shape.name.replace(' ', '_')}-{method}-{phase}"))
    return out


def svd_params() -> list:
    return [pytest.param(case, device, method, marks=_marks(device),
                         id=f"{device}-{case.name.replace(' ', '_')}-{method}")
            for device in devices() for case in svd_cases(device, quick_mode()) for method in SVD_METHODS]


def penalty_params() -> list:
    return [pytest.param(case, device, method, marks=_marks(device),
                         id=f"{device}-{case.name.replace(' ', '_')}-{method}")
            for device in devices() for case in penalty_cases(device, quick_mode()) for method in ("gram", "naive")]


def projection_params() -> list:
    return [pytest.param(case, device, method, marks=_marks(device),
                         id=f"{device}-{case.name.replace(' ', '_')}-{method}")
            for device in devices() for case in projection_cases(device, quick_mode())
            for method in ("taillor", "matmul")]


def frames_params() -> list:
    return [pytest.param(model, device, marks=_marks(device), id=f"{device}-{model.name}")
            for device in devices() for model in frames_models(device, quick_mode(), full_mode())]


def paired(benchmark, steps: dict, method: str, device: str) -> tuple[dict, dict]:
    """Time ``steps[method]`` against the other step of the pair, interleaved round by round: the other runs in
    pytest-benchmark's ``setup`` before every round of the timed target. Each step is a callable returning
    (seconds, result). Returns ({name: [seconds per round]}, {name: last result})."""
    other = next(name for name in steps if name != method)
    warmup, n_rounds = rounds(device)
    for _ in range(min(warmup, 1)):
        for step in steps.values():
            step()
    times = {method: [], other: []}
    results = {}

    def run(name):
        seconds, results[name] = steps[name]()
        times[name].append(seconds)

    def setup():
        run(other)
        return (), {}

    benchmark.pedantic(lambda: run(method), setup=setup, rounds=n_rounds, warmup_rounds=0, iterations=1)
    return times, results
