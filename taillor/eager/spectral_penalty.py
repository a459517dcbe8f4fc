"""Eager kernels of the spectral penalty in r×r Gram form, and its gradient.

With D = diag(ω²) and c = λ·s² (ΔW = s·U B A Vᵀ in full mode, s·B A in head mode):
  full:  pen = c·(⟨Bᵀ D B, A Aᵀ⟩ + ⟨Bᵀ B, A D Aᵀ⟩)                        A (r, k), B (k, r), ω² (k,)
  head:  pen = c·(⟨B_hᵀ D B_h, A Aᵀ⟩ + ⟨Bᵀ B, A_h D A_hᵀ⟩), B_h = U_hᵀ B, A_h = A V_h
                                                   A (r, d_in), B (d_out, r), U_h (d_out, h), V_h (d_in, h), ω² (h,)
These equal λ(‖Ω_Uᵀ ΔW‖²_F + ‖ΔW Ω_V‖²_F) because U, V have orthonormal columns: Ω_Uᵀ ΔW = s·diag(ω) B A Vᵀ and
‖X Vᵀ‖_F = ‖X‖_F. Gradients (all Gram matrices symmetric):
  full:  dA = 2c·(Bᵀ D B A + Bᵀ B A D),            dB = 2c·(D B A Aᵀ + B A D Aᵀ)
  head:  dA = 2c·((B_hᵀ D B_h) A + (Bᵀ B) A_h D V_hᵀ),   dB = 2c·(U_h D B_h A Aᵀ + B A_h D A_hᵀ)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def in_compute_dtype(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor],
                      omega2: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """A, B, U, V in the dtype the penalty is computed in: theirs, or ω²'s when it is wider (float16/bfloat16
    factors with float32 ω² are computed in float32, as the Triton kernel does). A no-op for float32 factors."""
    dtype = torch.promote_types(A.dtype, omega2.dtype)
    return A.to(dtype), B.to(dtype), None if U is None else U.to(dtype), None if V is None else V.to(dtype)


def _head_coordinates(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(B_h, A_h): B and A seen in the head coordinates (identity in full mode)."""
    if U is None:
        return B, A
    return U.t() @ B, A @ V


def penalty_grams(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor) -> tuple:
    """One layer's penalty operands in the compute dtype: (A, B, U, V, B_h, A_h) and the four r×r Grams
    (gram_A = A Aᵀ, gram_B = Bᵀ B, left = B_hᵀ D B_h, right = A_h D A_hᵀ). One place, so that every eager kernel
    built on them (value, gradient, the batched op's single layer) computes the same bits."""
    A, B, U, V = in_compute_dtype(A, B, U, V, omega2)
    B_h, A_h = _head_coordinates(A, B, U, V)
    gram_A = A @ A.t()
    gram_B = B.t() @ B
    left = (B_h.t() * omega2) @ B_h
    right = (A_h * omega2) @ A_h.t()
    return A, B, U, V, B_h, A_h, gram_A, gram_B, left, right


def spectral_penalty_forward(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                             coeff: float) -> Tensor:
    out_dtype = A.dtype
    *_, gram_A, gram_B, left, right = penalty_grams(A, B, U, V, omega2)
    return (coeff * ((left * gram_A).sum() + (gram_B * right).sum())).to(out_dtype)


def spectral_penalty_backward(grad: Tensor, A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor],
                              omega2: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
    out_dtype = A.dtype
    A, B, U, V, B_h, A_h, gram_A, gram_B, left, right = penalty_grams(A, B, U, V, omega2)
    factor = 2.0 * coeff * grad
    weighted_B_h = B_h * omega2[:, None]
    weighted_A_h = A_h * omega2
    if U is None:
        dA = left @ A + gram_B @ weighted_A_h
        dB = weighted_B_h @ gram_A + B @ right
    else:
        dA = left @ A + (gram_B @ weighted_A_h) @ V.t()
        dB = U @ (weighted_B_h @ gram_A) + B @ right
    return (dA * factor).to(out_dtype), (dB * factor).to(out_dtype)

