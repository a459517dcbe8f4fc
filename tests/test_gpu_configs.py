"""Every tuning config of every tuned Triton kernel against the float64 oracle on a GPU, at the speed goal's shape
and at odd shapes: the first GPU contact's coverage (marked ``gpu``; without CUDA every test skips with its
reason). Each test forces one config index at every launch site (``launch.forced_config``, modulo each site's
list), so the tuner's choice on one machine does not hide a config another machine would pick. The tests share
nothing and run in parallel (``pytest -m gpu -n <workers>`` with pytest-xdist).

The float64 oracles are computed on the GPU (the target shape's products are 275 GFLOP each); the bounds are the
table's "fast path" bounds: twice the eager path's error in the same dtype plus the floor.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA, DTYPE_ID, assert_matches_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")]

# (T, d_in, d_out, r) and the factor layout: the speed goal's shape with both layouts (full frame: P contiguous;
# head frame: P = Aᵀ strided), and sizes that are not multiples of 16 (masks, unaligned rows) with a prime rank.
ADAPTER_CASES = {
    "target-full": ((8192, 4096, 4096, 16), False),
    "target-head": ((8192, 4096, 4096, 16), True),
    "odd-head": ((1023, 4095, 4097, 13), True),
    "odd-full": ((77, 1000, 1030, 3), False),
}
# (k, d_in, d_out, r) of the full-frame projection: a 4096 x 4096 layer's frame, and odd sizes.
PROJECTION_CASES = {"target": (4096, 4096, 4096, 16), "odd": (4095, 4097, 1031, 13)}
CONFIG_INDICES = range(5)  # the longest list: the fused GEMM's 16-bit configs (pair: 4, dy pass: 3)
ROUTES = ("split", "fused", "onepass")


def _launchers(stem, route=None):
    from taillor import _kernels
    name = stem if route in (None, "fused") else f"{stem}_{route}"
    return getattr(_kernels, f"{name}_forward"), getattr(_kernels, f"{name}_backward")


def _randn(*shape, std=1.0, dtype, gen):
    return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) * std).to(dtype)


def check_adapter_on_gpu(forward, backward, T, d_in, d_out, r, dtype, strided):
    """Every output of one route's forward and backward against float64 products on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = 0.75
    x = _randn(T, d_in, dtype=dtype, gen=gen)
    W = _randn(d_out, d_in, std=d_in ** -0.5, dtype=dtype, gen=gen)
    b = _randn(d_out, dtype=dtype, gen=gen)
    P = _randn(r, d_in, std=d_in ** -0.5, dtype=dtype, gen=gen).t() if strided else \
        _randn(d_in, r, std=d_in ** -0.5, dtype=dtype, gen=gen)
    Q = _randn(d_out, r, std=0.5, dtype=dtype, gen=gen)
    dy = _randn(T, d_out, dtype=dtype, gen=gen)
    x64, W64, b64, P64, Q64, dy64 = (t.double() for t in (x, W, b, P, Q, dy))

    y, S = forward(x, W, b, P, Q, s, None)
    S64 = x64 @ P64
    assert_matches_oracle(S, S64, dtype, "S", eager=x @ P)
    assert_matches_oracle(y, x64 @ W64.T + s * S64 @ Q64.T + b64, dtype, "y",
                          eager=x @ W.T + s * ((x @ P) @ Q.T) + b)
    dx, dP, dQ, _ = backward(dy, x, W, S, P, Q, s, None, True, True, True)
    G64, G = dy64 @ Q64, dy @ Q
    assert_matches_oracle(dQ, s * dy64.T @ S64, dtype, "dQ", eager=s * (dy.T @ S))
    assert_matches_oracle(dP, s * x64.T @ G64, dtype, "dP", eager=s * (x.T @ G))
    assert_matches_oracle(dx, dy64 @ W64 + s * G64 @ P64.T, dtype, "dx", eager=dy @ W + s * (G @ P.T))


@pytest.mark.parametrize("index", CONFIG_INDICES)
@pytest.mark.parametrize("case", ADAPTER_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID.get)
@pytest.mark.parametrize("route", ROUTES)
def test_adapter_config_matches_float64(monkeypatch, route, dtype, case, index):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from taillor._kernels import launch
    (T, d_in, d_out, r), strided = ADAPTER_CASES[case]
    with launch.forced_config(index):
        check_adapter_on_gpu(*_launchers("tail_adapter", route), T, d_in, d_out, r, dtype, strided)


@pytest.mark.parametrize("index", CONFIG_INDICES)
@pytest.mark.parametrize("case", PROJECTION_CASES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=DTYPE_ID.get)
def test_projection_config_matches_float64(monkeypatch, out_dtype, case, index):
    """The frame's float32 factors projected into the activation dtype, and their gradients back."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from taillor._kernels import launch
    from test_spectral_projection import check_spectral_projection
    k, d_in, d_out, r = PROJECTION_CASES[case]
    with launch.forced_config(index):
        check_spectral_projection(*_launchers("spectral_projection"), k, d_in, d_out, r, torch.float32, "cuda",
                                  out_dtype)
