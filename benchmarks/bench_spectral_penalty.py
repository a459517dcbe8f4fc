"""The spectral penalty in r×r Gram form (taillor) against the naive form that materializes ΔW, forward and
backward. The other form runs in ``setup`` before every round (interleaved); ``extra_info`` holds the median
per-round ratio to the Gram form and the relative difference of the two values.
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.measurement import penalty_step
from taillor.bench.spectral_methods import penalty_functions
from taillor.bench.metrics import median

from .registry import paired, penalty_params


def _step(fn, params, device):
    """(forward+backward seconds, value)."""
    _, seconds, value = penalty_step(fn, params, device)
    return seconds, value


@pytest.mark.parametrize("case,device,method", penalty_params())
def test_spectral_penalty(benchmark, case, device, method):
    dev = torch.device(device)
    gram, naive, params = penalty_functions(case, dev)
    steps = {"gram": lambda: _step(gram, params, dev), "naive": lambda: _step(naive, params, dev)}
    times, values = paired(benchmark, steps, method, device)
    benchmark.group = f"spectral_penalty {device} {case.name}"
    benchmark.extra_info.update(
        case=case.name, device=device, method=method, rounds=len(times[method]),
        fwd_bwd_ms=1e3 * median(times[method]),
        ratio_to_gram=median(a / b for a, b in zip(times[method], times["gram"])),
        rel_diff=abs(values["gram"] - values["naive"]) / max(abs(values["naive"]), 1e-30))
