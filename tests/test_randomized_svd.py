"""randomized_svd against torch.linalg.svd in float64 on decaying, flat, rank-deficient and zero matrices.

The accuracy contract, dtypes, argument checks and non-finite inputs run on every backend of this machine: the
eager implementation on the CPU, and on a GPU (marked ``gpu``) whatever ``auto`` picks for CUDA tensors — the
CUDA extension when it is built. Batched-against-single and rank-deficient inputs run on the CPU here; the
extension's own tests (test_cuda_extension.py) cover them on the GPU.
"""
from __future__ import annotations

import pytest
import torch

import taillor
from conftest import CUDA, TOLERANCE, assert_close

DEVICES = [pytest.param("cpu", id="eager-cpu"),
           pytest.param("cuda", id="auto-cuda",
                        marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]


def matrix_with_spectrum(sigma: torch.Tensor, m: int, n: int, seed: int = 0, batch=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    return (U * sigma) @ V.mT


def largest_principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    cosines = torch.linalg.svdvals(X.double().mT @ Y.double()).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


SPECTRA = {
    "decaying": lambda m: torch.exp(-torch.arange(m, dtype=torch.float64) / 10),
    "flat": lambda m: 1.0 / torch.sqrt(torch.arange(m, dtype=torch.float64) + 1.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_top_k_accuracy(device, spectrum):
    m, n, k = 160, 200, 16
    A = matrix_with_spectrum(SPECTRA[spectrum](m), m, n).float()
    U, S, V = (t.cpu() for t in taillor.randomized_svd(A.to(device), k, niter=4, oversample=2 * k))
    U0, S0, V0h = torch.linalg.svd(A.double(), full_matrices=False)
    rel = ((S.double() - S0[:k]) / S0[:k]).abs().max()
    assert rel < TOLERANCE["sigma"], f"singular values off by {rel:.2e}"
    assert largest_principal_angle(U, U0[:, :k]) < TOLERANCE["angle"]
    assert largest_principal_angle(V, V0h[:k].mT) < TOLERANCE["angle"]
    assert U.dtype == torch.float32 and U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    eye = torch.eye(k)
    orthonormal = "orthonormal" if device == "cpu" else "orthonormal, loose"
    assert_close(U.mT @ U, eye, orthonormal, "U")
    assert_close(V.mT @ V, eye, orthonormal, "V")
    assert (S[:-1] >= S[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_for_a_seed(device):
    A = matrix_with_spectrum(SPECTRA["decaying"](48), 64, 48, batch=(2, 3)).float().to(device)
    U, S, V = taillor.randomized_svd(A, 8, seed=3)
    U2, S2, V2 = taillor.randomized_svd(A, 8, seed=3)
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(V, V2)
    assert U.shape == (2, 3, 64, 8) and S.shape == (2, 3, 8) and V.shape == (2, 3, 48, 8)


def test_batched_matches_one_by_one():
    A = matrix_with_spectrum(SPECTRA["decaying"](48), 64, 48, batch=(2, 3)).float()
    U, S, V = taillor.randomized_svd(A, 8, seed=3)
    for i in range(2):
        for j in range(3):
            Ui, Si, Vi = taillor.randomized_svd(A[i, j], 8, seed=3)
            assert_close(S[i, j], Si, "reordered", f"S[{i}, {j}]")
            assert_close(U[i, j] * Si @ Vi.mT, Ui * Si @ Vi.mT, "reordered product", f"U S Vᵀ [{i}, {j}]")


def test_rank_deficient_and_zero_matrices():
    sigma = torch.cat([torch.linspace(5, 1, 6, dtype=torch.float64), torch.zeros(34, dtype=torch.float64)])
    A = matrix_with_spectrum(sigma, 40, 50).float()
    U, S, V = taillor.randomized_svd(A, 10, niter=2, oversample=8)
    assert_close(S[:6].double(), sigma[:6], "reordered product", "S")
    assert S[6:].abs().max() <= TOLERANCE["rank deficient"] * S[0]
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    assert_close(U.mT @ U, torch.eye(10), "orthonormal, loose", "U")
    Z = torch.zeros(30, 20)
    U, S, V = taillor.randomized_svd(Z, 5)
    assert torch.equal(S, torch.zeros(5)) and torch.isfinite(U).all() and torch.isfinite(V).all()
    assert_close(U.mT @ U, torch.eye(5), "orthonormal", "U of zero")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(device, dtype):
    # Rank 10 <= the sketch of 12 columns: the algorithm is exact, what is left is the dtype's rounding.
    A = matrix_with_spectrum(SPECTRA["decaying"](10), 32, 40).to(dtype)
    U, S, V = taillor.randomized_svd(A.to(device), 4, niter=3, oversample=8)
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    S0 = torch.linalg.svdvals(A.double())[:4]
    assert ((S.cpu().double() - S0) / S0).abs().max() < TOLERANCE["exact sketch"][dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be"), (dict(k=41), "exceeds min"), (dict(k=4, niter=-1), "niter"),
    (dict(k=4, oversample=-2), "oversample"),
])
def test_bad_arguments(device, kwargs, match):
    with pytest.raises(ValueError, match=match):
        taillor.randomized_svd(torch.randn(40, 50, device=device), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_and_bad_shapes(device):
    A = torch.randn(10, 10)
    A[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        taillor.randomized_svd(A.to(device), 2)
    with pytest.raises(ValueError, match="matrix"):
        taillor.randomized_svd(torch.randn(10, device=device), 2)
    with pytest.raises(TypeError, match="floating"):
        taillor.randomized_svd(torch.ones(4, 4, dtype=torch.int64, device=device), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_finite_input_whose_sketch_overflows_is_not_called_non_finite(device):
    """Every entry finite, but A Ω overflows float32: the error says so (and how to avoid it), not "NaN or Inf"."""
    A = torch.full((16, 16), 3e38)
    assert bool(torch.isfinite(A).all())
    with pytest.raises(ValueError, match="finite, but its random sketch overflowed") as info:
        taillor.randomized_svd(A.to(device), 2)
    assert "NaN" not in str(info.value) and "scale the matrix down" in str(info.value)
