"""The spectral penalty in r×r Gram form (taillor) against the naive form that materializes ΔW, forward and
backward. The other form runs in ``setup`` before every round (interleaved); ``extra_info`` holds the median
per-round ratio to the Gram form and the relative difference of the two values. Second suite: a layer's penalty
with the adaptive strength against a fixed λ (``ratio_to_fixed``).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import taillor
from taillor.bench.measurement import penalty_step
from taillor.bench.spectral_methods import penalty_functions
from taillor.bench.metrics import median, sync
from taillor.bench.shapes import PenaltyCase, fast_mode, quick_mode

from .registry import devices, paired, penalty_params


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


# The adaptive strength (head_share_target: a dual step on λ per optimizer step) against a fixed λ, on one layer,
# A and B moved between calls as an optimizer would: the price of the dual step, as a ratio in the same run.
STRENGTH_CASES = (PenaltyCase(1024, 16, "head", 128, "strength"), PenaltyCase(1024, 16, "full", 0, "strength"))


def strength_params() -> list:
    cases = (PenaltyCase(48, 4, "head", 8, "fast"), PenaltyCase(48, 4, "full", 0, "fast")) if fast_mode() \
        else STRENGTH_CASES[:1] if quick_mode() else STRENGTH_CASES
    return [pytest.param(case, device, method, marks=[pytest.mark.gpu] if device == "cuda" else [],
                         id=f"{device}-{case.frame}-{case.d}-{method}")
            for device in devices() for case in cases for method in ("fixed", "adaptive")]


def _strength_step(layer, device):
    """(seconds of the layer's penalty forward + backward, λ) after an optimizer-like change of A and B."""
    with torch.no_grad():
        layer.lora_A.mul_(1.0001)
        layer.lora_B.add_(1e-4)
    layer.lora_A.grad = layer.lora_B.grad = None
    sync(device)
    t0 = time.perf_counter()
    layer.spectral_penalty().backward()
    sync(device)
    return time.perf_counter() - t0, float(layer.penalty_strength)


@pytest.mark.parametrize("case,device,method", strength_params())
def test_adaptive_strength_penalty(benchmark, case, device, method):
    dev = torch.device(device)
    layers = {}
    for name, target in (("fixed", None), ("adaptive", 0.05)):
        torch.manual_seed(0)
        layer = taillor.TailLoRLinear.from_linear(nn.Linear(case.d, case.d), rank=case.rank, frame=case.frame,
                                                  head=case.head if case.frame == "head" else 0.125,
                                                  head_share_target=target).to(dev)
        with torch.no_grad():
            layer.lora_B.normal_(std=1e-2)
        layers[name] = layer
    steps = {name: (lambda layer=layer: _strength_step(layer, dev)) for name, layer in layers.items()}
    times, _ = paired(benchmark, steps, method, device)
    benchmark.group = f"adaptive strength {device} {case.frame} {case.d} r{case.rank}"
    benchmark.extra_info.update(
        case=f"{case.frame} {case.d}x{case.d} r{case.rank} h{case.head}", device=device, method=method,
        threads=torch.get_num_threads(), rounds=len(times[method]), fwd_bwd_ms=1e3 * median(times[method]),
        ratio_to_fixed=median(a / b for a, b in zip(times[method], times["fixed"])))
