"""Eager kernels of the spectral projection (full frame): P = V Aᵀ, Q = U B and its backward.

Shapes: U (d_out, k), V (d_in, k), A (r, k), B (k, r) -> P (d_in, r), Q (d_out, r).
Backward: dA = dPᵀ V (r, k), dB = Uᵀ dQ (k, r) (P is linear in A, Q in B); a None upstream gradient gives an
empty 1-D output (the op schema's "not computed").
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .gemm_forms import narrow_matmul


def spectral_projection_forward(A: Tensor, B: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    return narrow_matmul(V, A.t()), narrow_matmul(U, B)


def spectral_projection_backward(dP: Optional[Tensor], dQ: Optional[Tensor], U: Tensor,
                                 V: Tensor) -> tuple[Tensor, Tensor]:
    dA = dP.t() @ V if dP is not None else U.new_empty(0)
    dB = (dQ.t() @ U).t().contiguous() if dQ is not None else U.new_empty(0)  # (dQᵀ U)ᵀ: no transposed (d, k)
    return dA, dB
