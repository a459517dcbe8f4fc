"""Shared test helpers: the one per-dtype tolerance table and the dense float64 oracles."""
from __future__ import annotations

import pytest
import torch

# Normalized error bound max|actual - oracle| / max|oracle| per dtype, for one layer of the sizes used in tests
# (d <= 256): a few ulps of accumulation error in the compute dtype. The one table every comparison uses.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Floor added to 2x the eager error when a fast path is compared with eager against the oracle (flash-attention
# style): fast_error <= 2 * eager_error + FLOOR[dtype].
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def normalized_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    actual, oracle = actual.detach(), oracle.detach().double()
    scale = oracle.abs().max().clamp_min(1e-30)
    return float((actual.double() - oracle).abs().max() / scale)


def assert_matches_oracle(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    err = normalized_error(actual, oracle)
    assert err <= TOLERANCE[dtype], f"{what}: normalized error {err:.3e} > {TOLERANCE[dtype]:.1e} ({dtype})"


def dense_delta(layer) -> torch.Tensor:
    """Oracle ΔW in float64 from the layer's own frame and parameters."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    s = layer.scaling
    if layer.config.frame == "full":
        return s * layer.frame.U.double() @ B @ A @ layer.frame.V.double().t()
    return s * B @ A


def dense_penalty(layer, A=None, B=None, strength=None) -> torch.Tensor:
    """Oracle penalty λ(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) with ΔW materialized in float64 (differentiable in A, B);
    λ = ``strength``, default ``layer.config.penalty``."""
    A = layer.lora_A.detach().double() if A is None else A
    B = layer.lora_B.detach().double() if B is None else B
    U, V = layer.frame.U.double(), layer.frame.V.double()
    s = layer.scaling
    delta = s * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)
    omega = layer.frame.omega2.double().sqrt()
    omega_U, omega_V = U * omega, V * omega
    strength = layer.config.penalty if strength is None else strength
    return strength * ((omega_U.t() @ delta).pow(2).sum() + (delta @ omega_V).pow(2).sum())


def dense_head_share(layer) -> float:
    """Oracle share (‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) / (2‖ΔW‖²) with ΔW materialized in float64."""
    delta = dense_delta(layer)
    omega = layer.frame.omega2.double().sqrt()
    U, V = layer.frame.U.double() * omega, layer.frame.V.double() * omega
    weighted = (U.t() @ delta).pow(2).sum() + (delta @ V).pow(2).sum()
    return float(weighted / (2 * delta.pow(2).sum()))


@pytest.fixture
def interpreter(monkeypatch):
    """Run Triton kernels in the Triton interpreter for this test only (CPU tensors allowed).

    taillor reads TRITON_INTERPRET at every launch, so setting it here affects this test and nothing collected or
    imported before it; the compiled-kernel tests (marked `gpu`) never use this fixture.
    """
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
