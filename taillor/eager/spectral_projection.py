"""Eager kernels of the spectral projection (full frame): P = V Aᵀ, Q = U B and its backward.

Shapes: U (d_out, k), V (d_in, k), A (r, k), B (k, r) -> P (d_in, r), Q (d_out, r), in ``out_dtype`` when given
(computed in the inputs' dtype, then rounded: the CPU has no faster 16-bit path).
Backward: dA = dPᵀ V (r, k), dB = Uᵀ dQ (k, r) (P is linear in A, Q in B); a None upstream gradient gives an
empty 1-D output (the op schema's "not computed").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gemm_forms import narrow_matmul


def spectral_projection_forward(A: Tensor, B: Tensor, U: Tensor, V: Tensor,
                                out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    P, Q = narrow_matmul(V, A.t()), narrow_matmul(U, B)
    if out_dtype is None or out_dtype == P.dtype:
        return P, Q
    return P.to(out_dtype), Q.to(out_dtype)


def spectral_projection_backward(dP: Optional[Tensor], dQ: Optional[Tensor], U: Tensor,
                                 V: Tensor) -> tuple[Tensor, Tensor]:
    # dP, dQ may come in the projection's out_dtype (16-bit): the products run in the frame's dtype.
    dA = dP.t().to(V.dtype) @ V if dP is not None else U.new_empty(0)
    dB = (dQ.t().to(U.dtype) @ U).t().contiguous() if dQ is not None else U.new_empty(0)  # no transposed (d, k)
    return dA, dB
