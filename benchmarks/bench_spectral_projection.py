"""The full-frame spectral projection P = V Aᵀ, Q = U B (taillor.spectral_projection: one op, fused launch on CUDA)
against the same two products as plain autograd matmuls, forward and backward (dA = dPᵀ V, dB = Uᵀ dQ).

A full-frame TailLoRLinear pays this once per step on top of the rank-r LoRA product. The plain form runs in
``setup`` before every round (interleaved); ``extra_info`` holds the median per-round ratio to it and the largest
difference of the two results (relative to the largest entry).
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.spectral_methods import projection_functions
from taillor.bench.metrics import median, time_call

from .registry import paired, projection_params


def _step(fn, params, device):
    """(forward+backward seconds, (P, Q)) with a unit upstream gradient on both outputs."""
    for p in params:
        p.grad = None

    def run():
        P, Q = fn()
        (P.float().sum() + Q.float().sum()).backward()
        return P.detach(), Q.detach()

    return time_call(run, device)


@pytest.mark.parametrize("case,device,method", projection_params())
def test_spectral_projection(benchmark, case, device, method):
    dev = torch.device(device)
    ours, matmul, params = projection_functions(case, dev)
    steps = {"taillor": lambda: _step(ours, params, dev), "matmul": lambda: _step(matmul, params, dev)}
    times, results = paired(benchmark, steps, method, device)
    diff = max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
               for a, b in zip(results["taillor"], results["matmul"]))
    benchmark.group = f"spectral_projection {device} {case.name}"
    benchmark.extra_info.update(
        case=case.name, device=device, method=method, rounds=len(times[method]),
        fwd_bwd_ms=1e3 * median(times[method]),
        ratio_to_matmul=median(a / b for a, b in zip(times[method], times["matmul"])), max_rel_diff=diff)
