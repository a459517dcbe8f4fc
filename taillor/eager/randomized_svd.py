"""Eager randomized SVD (Halko, Martinsson & Tropp 2011), batched over leading dims; the fallback and oracle of
the CUDA extension.

For A (..., m, n) and l = min(k + oversample, m, n):
  1. range finder: Y = A Ω with a seeded Gaussian Ω (n, l); Q = orth(Y);
  2. power iterations, each re-orthonormalized: Q ← orth(A orth(Aᵀ Q)) — the error of the captured subspace
     falls like (σ_{l+1}/σ_k)^(2·niter+1), so flat spectra need more iterations or more oversampling;
  3. small SVD without squaring the condition number: Bᵀ = Aᵀ Q = Q₂ R (Householder), Rᵀ = U_r Σ V_rᵀ, so
     A ≈ Q Qᵀ A = (Q U_r) Σ (Q₂ V_r)ᵀ.
orth() is CholeskyQR2 — Gram in float64, Cholesky, triangular solve, twice — which is cheap (one GEMM) and
orthonormal to working precision when cond(Y) < ~1e6; for worse-conditioned or rank-deficient Y (the Cholesky
fails or its diagonal spans more than 1e6) it falls back to Householder QR.
fp16/bf16 inputs are computed in float32; float64 stays float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

_CHOLESKY_QR_MAX_COND = 1e6


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, bool]:
    Y64 = Y.double()
    gram = Y64.mT @ Y64
    R, info = torch.linalg.cholesky_ex(gram, upper=True)
    if bool((info != 0).any()):
        return Y, False
    diag = R.diagonal(dim1=-2, dim2=-1).abs()
    if bool((diag.amin(-1) * _CHOLESKY_QR_MAX_COND <= diag.amax(-1)).any()):
        return Y, False
    Q = torch.linalg.solve_triangular(R, Y64, upper=True, left=False)
    return Q.to(Y.dtype), True


def orthonormalize(Y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of Y (..., m, l), l <= m: CholeskyQR2, Householder when ill-conditioned."""
    Q, ok = _cholesky_qr(Y)
    if ok:
        Q, ok = _cholesky_qr(Q)
    if not ok:
        Q = torch.linalg.qr(Y).Q
    return Q


def randomized_svd(A: Tensor, k: int, niter: int, oversample: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(compute_dtype)
    m, n = A.shape[-2:]
    sketch = min(k + oversample, m, n)
    generator = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, sketch, generator=generator, device=A.device, dtype=compute_dtype)
    Q = orthonormalize(A @ omega)
    for _ in range(niter):
        Q = orthonormalize(A @ orthonormalize(A.mT @ Q))
    Q2, R = torch.linalg.qr(A.mT @ Q)
    U_r, S, V_rh = torch.linalg.svd(R.mT)
    U = Q @ U_r[..., :k]
    V = Q2 @ V_rh.mT[..., :k]
    return U, S[..., :k].contiguous(), V
