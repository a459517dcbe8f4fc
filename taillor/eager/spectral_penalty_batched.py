"""Eager kernels of the batched spectral penalty: L layers of one shape at once (the model's penalty, one call
per shape group), and each update's energy ‖B A‖² from the same Gram matrices (the adaptive strength's dual step).

Per layer, the formulas of :mod:`taillor.eager.spectral_penalty` (M1 = B_hᵀ D B_h, M2 = Bᵀ B, M3 = A Aᵀ,
M4 = A_h D A_hᵀ): value = c·(⟨M1, M3⟩ + ⟨M2, M4⟩), total = c·⟨M2, M3⟩, batched over the leading dimension.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .spectral_penalty import in_compute_dtype, penalty_grams, spectral_penalty_backward


def _batched_grams(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor):
    """(M1, M2, M3, M4, B_h, A_h) of L layers: M1 = B_hᵀ D B_h, M2 = Bᵀ B, M3 = A Aᵀ, M4 = A_h D A_hᵀ (L, r, r)."""
    if U is None:
        B_h, A_h = B, A
    else:
        B_h, A_h = U.mT @ B, A @ V
    w = omega2[:, None, :]
    M1 = (B_h.mT * w) @ B_h
    M2 = B.mT @ B
    M3 = A @ A.mT
    M4 = (A_h * w) @ A_h.mT
    return M1, M2, M3, M4, B_h, A_h


def _one_layer(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
               coeff: float) -> tuple[Tensor, Tensor]:
    """(value, total) of one layer, 0-dim: the value as :func:`spectral_penalty_forward` computes it (the same
    operations, so the same bits), the total from its Gram matrices."""
    out_dtype = A.dtype
    *_, gram_A, gram_B, left, right = penalty_grams(A, B, U, V, omega2)
    value = coeff * ((left * gram_A).sum() + (gram_B * right).sum())
    return value.to(out_dtype), (coeff * (gram_A * gram_B).sum()).to(out_dtype)


def spectral_penalty_batched_forward(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor],
                                     omega2: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
    """(value, total) of L layers, each (L,) in A's dtype: value_l = c·(⟨M1, M3⟩ + ⟨M2, M4⟩) (the penalty) and
    total_l = c·⟨M3, M2⟩ = c·‖B_l A_l‖²_F (‖ΔW_l‖²_F for c = s², U and V having orthonormal columns), from the
    same Gram matrices. A (L, r, a), B (L, b, r), U (L, b, h) and V (L, a, h) or None (full frame, h = a = b),
    omega2 (L, h). Unbatched inputs (one layer: A (r, a), B (b, r), ...) give 0-dim results."""
    if A.dim() == 2:
        return _one_layer(A, B, U, V, omega2, coeff)
    out_dtype = A.dtype
    A, B, U, V = in_compute_dtype(A, B, U, V, omega2)
    M1, M2, M3, M4, _, _ = _batched_grams(A, B, U, V, omega2)
    value = (M1 * M3 + M2 * M4).sum((1, 2)) * coeff
    total = (M2 * M3).sum((1, 2)) * coeff
    return value.to(out_dtype), total.to(out_dtype)


def spectral_penalty_batched_backward(grad: Tensor, A: Tensor, B: Tensor, U: Optional[Tensor],
                                      V: Optional[Tensor], omega2: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
    """(dA, dB) of Σ_l grad_l·value_l (``total`` is not differentiated: it only feeds the strength's dual step);
    grad (L,), shapes as in :func:`spectral_penalty_batched_forward`. The single-layer formulas, batched."""
    if A.dim() == 2:  # one layer (the layer's own adaptive penalty): the single-layer kernel
        return spectral_penalty_backward(grad, A, B, U, V, omega2, coeff)
    out_dtype = A.dtype
    A, B, U, V = in_compute_dtype(A, B, U, V, omega2)
    M1, M2, M3, M4, B_h, A_h = _batched_grams(A, B, U, V, omega2)
    factor = (2.0 * coeff) * grad.to(A.dtype)[:, None, None]
    w = omega2[:, None, :]
    weighted_B_h = B_h * omega2[:, :, None]
    weighted_A_h = A_h * w
    if U is None:
        dA = M1 @ A + M2 @ weighted_A_h
        dB = weighted_B_h @ M3 + B @ M4
    else:
        dA = M1 @ A + (M2 @ weighted_A_h) @ V.mT
        dB = U @ (weighted_B_h @ M3) + B @ M4
    return (dA * factor).to(out_dtype), (dB * factor).to(out_dtype)
