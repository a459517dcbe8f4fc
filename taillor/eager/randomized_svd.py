"""Eager randomized SVD (Halko, Martinsson & Tropp 2011), batched over leading dims; the fallback and oracle of
the CUDA extension.

For A (..., m, n) and l = min(k + oversample, m, n):
  1. range finder: Y = A Ω with a seeded Gaussian Ω (n, l); Q = orth(Y);
  2. power iterations, each re-orthonormalized: Q ← orth(A orth(Aᵀ Q)) — the error of the captured subspace
     falls like (σ_{l+1}/σ_k)^(2·niter+1), so flat spectra need more iterations or more oversampling. Between
     power steps a well-conditioned basis is all that is needed, so those get one CholeskyQR pass; the basis
     that is kept gets two;
  3. small SVD without squaring the condition number: Bᵀ = Aᵀ Q = Q₂ R (Householder), Rᵀ = U_r Σ V_rᵀ, so
     A ≈ Q Qᵀ A = (Q U_r) Σ (Q₂ V_r)ᵀ.
orth() is CholeskyQR2 — Gram in float64 (exact for float32 data, so squaring cond(Y) is harmless), Cholesky,
triangular solve in the working dtype, twice — which is cheap (GEMMs) and orthonormal to working precision when
cond(Y) < ~1e6; for worse-conditioned or rank-deficient Y (the Cholesky fails or its diagonal spans more than
1e6) it falls back to Householder QR. fp16/bf16 inputs are computed in float32; float64 stays float64.
Non-finite input is detected on the sketch A Ω (a NaN or Inf in A reaches it with probability 1), which costs a
pass over m×l numbers instead of m×n; only then is A itself read, to tell a NaN or Inf in A from a finite A whose
sketch overflowed the compute dtype (:func:`sketch_error`).
"""
from __future__ import annotations

import torch
from torch import Tensor

_CHOLESKY_QR_MAX_COND = 1e6


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, bool]:
    Y64 = Y.double()
    R, info = torch.linalg.cholesky_ex(Y64.mT @ Y64, upper=True)
    if bool((info != 0).any()):
        return Y, False
    diag = R.diagonal(dim1=-2, dim2=-1).abs()
    if bool((diag.amin(-1) * _CHOLESKY_QR_MAX_COND <= diag.amax(-1)).any()):
        return Y, False
    return torch.linalg.solve_triangular(R.to(Y.dtype), Y, upper=True, left=False), True


def orthonormalize(Y: Tensor, passes: int = 2) -> Tensor:
    """Basis of the columns of Y (..., m, l), l <= m, by ``passes`` CholeskyQR passes (2: orthonormal to working
    precision; 1: well conditioned), or by Householder QR when Y is ill-conditioned or rank-deficient."""
    Q = Y
    for _ in range(passes):
        Q, ok = _cholesky_qr(Q)
        if not ok:
            return torch.linalg.qr(Y).Q
    return Q


def sketch_error(A: Tensor) -> ValueError:
    """The error for a non-finite sketch A Ω, saying what happened: A has NaN or Inf entries, or A is finite and
    the sketch overflowed (entries near the dtype's maximum; the singular vectors do not depend on A's scale)."""
    if not bool(torch.isfinite(A).all()):
        return ValueError("randomized_svd: the input has non-finite entries (NaN or Inf)")
    compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    return ValueError(f"randomized_svd: the input is finite, but its random sketch overflowed {compute_dtype} "
                      f"(largest |entry| {float(A.abs().max()):.3g}); scale the matrix down (its singular values "
                      f"scale with it, its singular vectors do not change) or pass it in float64")


def randomized_svd(A: Tensor, k: int, niter: int, oversample: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    original, A = A, A.to(compute_dtype)
    m, n = A.shape[-2:]
    sketch = min(k + oversample, m, n)
    generator = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, sketch, generator=generator, device=A.device, dtype=compute_dtype)
    Y = A @ omega
    if not bool(torch.isfinite(Y).all()):
        raise sketch_error(original)
    Q = orthonormalize(Y, passes=1 if niter else 2)
    for step in range(niter):
        Q = orthonormalize(A @ orthonormalize(A.mT @ Q, passes=1), passes=1 if step < niter - 1 else 2)
    Q2, R = torch.linalg.qr(A.mT @ Q)
    U_r, S, V_rh = torch.linalg.svd(R.mT)
    U = Q @ U_r[..., :k]
    V = Q2 @ V_rh.mT[..., :k]
    return U, S[..., :k].contiguous(), V
