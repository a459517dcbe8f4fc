"""taillor.build_frames (head mode, h = 256) over every target layer of a Llama-shaped model, against a loop of
torch.svd_lowrank with the same sketch per matrix and torch.linalg.svd on one layer (scaled to all layers).

Weights: random, singular values σ_i = (1 + i)^-0.5 (see taillor.bench.spectral_methods.model_weights). CPU: one
layer of the Llama-3.2-1B shapes (all 16 with TAILLOR_BENCH_FULL=1); CUDA: Llama-2-7B shapes (224 matrices). build_frames is
the timed target; the loop of svd_lowrank and the exact SVD are timed once per round next to it, and
``extra_info`` holds the speed-ups and the σ / subspace errors on layer 0 against the exact SVD.
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.spectral_methods import FramesBench
from taillor.bench.metrics import median, time_call

from .registry import frames_params


@pytest.mark.parametrize("model,device", frames_params())
def test_build_frames(benchmark, model, device):
    dev = torch.device(device)
    bench = FramesBench(model, dev)
    bench.warmup()
    lowrank_times, own = [], []
    results = {}

    def setup():
        seconds, results["svd_lowrank"] = time_call(bench.lowrank, dev)
        lowrank_times.append(seconds)
        return (), {}

    def target():
        seconds, results["build_frames"] = time_call(bench.ours, dev)
        own.append(seconds)

    benchmark.pedantic(target, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
    exact_seconds, exact = time_call(bench.exact_layer0, dev)
    ours_err, lowrank_err = bench.errors(results["build_frames"], exact), bench.errors(results["svd_lowrank"], exact)
    benchmark.group = f"build_frames {device} {model.name}"
    benchmark.extra_info.update(
        **bench.describe(), build_frames_s=median(own), svd_lowrank_loop_s=median(lowrank_times),
        linalg_svd_one_layer_s=exact_seconds, linalg_svd_all_layers_s_extrapolated=exact_seconds * model.layers,
        speedup_vs_svd_lowrank=median(lowrank_times) / median(own),
        speedup_vs_linalg_svd=exact_seconds * model.layers / median(own),
        sigma_rel_error=ours_err[0], max_angle_rad=ours_err[1],
        svd_lowrank_sigma_rel_error=lowrank_err[0], svd_lowrank_max_angle_rad=lowrank_err[1])
