"""taillor.randomized_svd against torch.svd_lowrank with the same sketch (q = k + oversample, same niter) and the
exact torch.linalg.svd, with the relative error of the top-k singular values next to the time.

The test matrix has singular values σ_i = (1 + i)^-decay and random singular vectors. The other two methods run
in ``setup`` before every round (interleaved); ``extra_info`` holds the median per-round ratio to svd_lowrank,
the speed-up over linalg.svd and the σ error.
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.spectral_methods import SVD_METHODS, spectrum_matrix, svd_functions
from taillor.bench.metrics import max_principal_angle, median, sigma_rel_error, time_call

from .registry import rounds, svd_params

_CACHE: dict = {}


@pytest.mark.parametrize("case,device,method", svd_params())
def test_randomized_svd(benchmark, case, device, method):
    dev = torch.device(device)
    key = (case, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = spectrum_matrix(case.m, case.n, case.decay, device=dev)
    W, sigma = _CACHE[key]
    fns = svd_functions(case)
    warmup, n_rounds = rounds(device)
    for fn in fns.values():
        for _ in range(min(warmup, 1)):
            fn(W)
    others = [m for m in SVD_METHODS if m != method]
    ref_times: dict[str, list[float]] = {m: [] for m in others}
    own: list[float] = []
    results = {}

    def setup():
        for m in others:
            seconds, results[m] = time_call(lambda: fns[m](W), dev)
            ref_times[m].append(seconds)
        return (), {}

    def target():
        seconds, results[method] = time_call(lambda: fns[method](W), dev)
        own.append(seconds)

    benchmark.pedantic(target, setup=setup, rounds=max(1, n_rounds // 3), warmup_rounds=0, iterations=1)
    times = {method: own, **ref_times}
    benchmark.group = f"randomized_svd {device} {case.name}"
    benchmark.extra_info.update(
        case=case.name, device=device, method=method, rounds=len(own), ms=1e3 * median(own),
        ratio_to_svd_lowrank=median(a / b for a, b in zip(own, times["svd_lowrank"])),
        speedup_vs_linalg_svd=median(b / a for a, b in zip(own, times["linalg.svd"])),
        sigma_rel_error=sigma_rel_error(results[method][1], sigma),
        max_angle_rad=max_principal_angle(results[method][2], results["linalg.svd"][2]))
