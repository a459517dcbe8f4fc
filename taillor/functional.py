"""Functional ops of taillor: autograd (written once, here) over the custom ops of :mod:`taillor.ops`.

Public functions take and return plain tensors; shapes and dtypes are in each docstring.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _differentiable(name: str, op, setup_context, backward):
    """Give ``op`` its autograd (once, for both routes) and return the callable the public functions use.

    While torch.compile traces, the call is the custom op itself with ``backward`` registered on it: one opaque
    node. In eager mode it is an autograd.Function with the same ``setup_context`` and ``backward`` around the
    op's device kernel (:func:`taillor.ops.call`), which skips the custom op's Python dispatch in both passes.
    """
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward(ctx, *args):
        # ctx-first form: the setup_context form binds apply()'s arguments with inspect.signature on every call.
        output = ops.call(op, *args)
        setup_context(ctx, args, output)
        return output

    eager = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                      "backward": staticmethod(backward)})

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager.apply(*args)
    return call


# ---------------------------------------------------------------------------------------------------------------
# tail_adapter
# ---------------------------------------------------------------------------------------------------------------
def _adapter_setup_context(ctx, inputs, output):
    x, weight, bias, P, Q, scale, x_adapter = inputs
    _, S = output
    ctx.mark_non_differentiable(S)
    ctx.save_for_backward(x, weight, S, P, Q, x_adapter)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _adapter_backward(ctx, dy, _dS):
    x, weight, S, P, Q, x_adapter = ctx.saved_tensors
    need_x, need_w, need_b, need_P, need_Q, _, need_xa = ctx.needs_input_grad
    dy = dy.contiguous()
    dx, dP, dQ, dx_adapter = ops.call(ops.tail_adapter_bwd, dy, x, weight, S, P, Q, ctx.scale, x_adapter,
                                     need_x or need_xa, need_P, need_Q)
    # The base layer is frozen in TailLoR; if a user unfreezes it, its gradients are still exact.
    dW = dy.t() @ x if need_w else None
    db = dy.sum(0) if (need_b and ctx.has_bias) else None
    return (_none_if_empty(dx), dW, db, _none_if_empty(dP), _none_if_empty(dQ), None,
            _none_if_empty(dx_adapter))


_tail_adapter = _differentiable("TailAdapter", ops.tail_adapter_fwd, _adapter_setup_context, _adapter_backward)


def _rows(t: Tensor) -> Tensor:
    """(..., d) -> (N, d) with unit stride along d, as the kernels read rows (a copy only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def taillor_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], P: Tensor, Q: Tensor, scale: float,
                   x_adapter: Optional[Tensor] = None) -> Tensor:
    """y = x Wᵀ + b + scale·(x_a P) Qᵀ, a frozen linear layer plus a rank-r adapter in layer coordinates.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; P: (d_in, r); Q: (d_out, r); all of x's dtype.
    x_adapter: the adapter's input (..., d_in), e.g. dropout(x); None means x itself (and fuses dx).
    Returns (..., d_out) in x's dtype. Differentiable in x, P, Q (and weight/bias if they require grad).
    """
    lead = x.shape[:-1]
    x2 = _rows(x)
    xa2 = None if x_adapter is None else _rows(x_adapter)
    y, _ = _tail_adapter(x2, weight, bias, P, Q, float(scale), xa2)
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# spectral_projection
# ---------------------------------------------------------------------------------------------------------------
def _projection_setup_context(ctx, inputs, output):
    _, _, U, V, _ = inputs
    ctx.save_for_backward(U, V)


def _projection_backward(ctx, dP, dQ):
    U, V = ctx.saved_tensors
    dA, dB = ops.call(ops.spectral_projection_bwd, dP, dQ, U, V)
    return _none_if_empty(dA), _none_if_empty(dB), None, None, None


_spectral_projection = _differentiable("SpectralProjection", ops.spectral_projection_fwd,
                                       _projection_setup_context, _projection_backward)


def spectral_projection(A: Tensor, B: Tensor, U: Tensor, V: Tensor,
                        out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Full-frame adapter factors in layer coordinates: P = V Aᵀ (d_in, r) and Q = U B (d_out, r).

    A: (r, k); B: (k, r); U: (d_out, k); V: (d_in, k); one floating dtype. ``out_dtype`` (default: that dtype)
    is the dtype of P and Q: pass the layer's 16-bit activation dtype to get them ready for the adapter product
    (on CUDA the projection then runs on tensor cores). Differentiable in A and B (gradients in A's dtype).
    """
    return _spectral_projection(A, B, U, V, None if out_dtype == A.dtype else out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# spectral_penalty
# ---------------------------------------------------------------------------------------------------------------
def _penalty_setup_context(ctx, inputs, output):
    A, B, U, V, omega2, coeff = inputs
    ctx.save_for_backward(A, B, U, V, omega2)
    ctx.coeff = coeff


def _penalty_backward(ctx, grad):
    A, B, U, V, omega2 = ctx.saved_tensors
    dA, dB = ops.call(ops.spectral_penalty_bwd, grad, A, B, U, V, omega2, ctx.coeff)
    return dA, dB, None, None, None, None


_spectral_penalty = _differentiable("SpectralPenalty", ops.spectral_penalty_fwd, _penalty_setup_context,
                                    _penalty_backward)


def spectral_penalty(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                     coeff: float) -> Tensor:
    """The TailLoR penalty of one layer, coeff·(‖diag(ω) B_h A‖²_F + ‖B A_h diag(ω)‖²_F), in r×r Gram form.

    Full frame (U = V = None): A (r, k), B (k, r), omega2 (k,). Head frame: A (r, d_in), B (d_out, r),
    U (d_out, h), V (d_in, h), omega2 (h,), with B_h = Uᵀ B and A_h = A V; U and V may be stored in a narrower
    float dtype than A and B (a 16-bit frame): the kernels read them in A's dtype, and autograd keeps them as
    stored. coeff = λ·s². Returns a 0-dim tensor of A's dtype, differentiable in A and B. Never materializes ΔW:
    O(k r²) instead of O(d_out d_in r).
    """
    return _spectral_penalty(A, B, U, V, omega2, float(coeff))


def _batched_penalty_setup_context(ctx, inputs, output):
    A, B, U, V, omega2, coeff = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(A, B, U, V, omega2)
    ctx.coeff = coeff


def _batched_penalty_backward(ctx, grad, _grad_total):
    A, B, U, V, omega2 = ctx.saved_tensors
    dA, dB = ops.call(ops.spectral_penalty_batched_bwd, grad.contiguous(), A, B, U, V, omega2, ctx.coeff)
    return dA, dB, None, None, None, None


_spectral_penalty_batched = _differentiable("SpectralPenaltyBatched", ops.spectral_penalty_batched_fwd,
                                            _batched_penalty_setup_context, _batched_penalty_backward)


def spectral_penalty_batched(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                             coeff: float) -> tuple[Tensor, Tensor]:
    """The penalty of L layers of one shape in one call, and each update's energy: (value, total), both (L,).

    value_l = coeff·(‖diag(ω_l) B_h A_l‖²_F + ‖B_l A_h diag(ω_l)‖²_F), as :func:`spectral_penalty` for layer l;
    total_l = coeff·‖B_l A_l‖²_F, which is ‖ΔW_l‖²_F for coeff = s² (the frame has orthonormal columns), for the
    strength's dual step; it is computed from the same Gram matrices and is not differentiable.
    A (L, r, a), B (L, b, r); full frame: U = V = None, a = b = k, omega2 (L, k); head frame: U (L, b, h),
    V (L, a, h), omega2 (L, h). value is differentiable in A and B; both come back in A's dtype. One layer's
    unbatched inputs (A (r, a), B (b, r), ...) give 0-dim results (no batch dimension to add and remove).
    """
    return _spectral_penalty_batched(A, B, U, V, omega2, float(coeff))


# ---------------------------------------------------------------------------------------------------------------
# randomized_svd
# ---------------------------------------------------------------------------------------------------------------
def canonicalize_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its left vector is positive.

    Makes frames independent of the SVD routine's sign convention (LAPACK, cuSOLVER, randomized).
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.gather(U, -2, idx).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def randomized_svd(W: Tensor, k: int, niter: int = 2, oversample: int = 8,
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of W (..., m, n), batched over leading dims: W ≈ U diag(S) Vᵀ.

    Returns U (..., m, k), S (..., k) descending, V (..., n, k), in float32 (float64 for float64 input; fp16 and
    bf16 are computed in float32). Seeded and deterministic for a given seed, device and shape. Uses the CUDA
    extension for CUDA tensors when it is built, the PyTorch implementation otherwise. Not differentiable.
    Raises ValueError on k outside [1, min(m, n)], negative niter/oversample, fewer than 2 dims, non-finite W, or a
    finite W whose random sketch overflows (both detected on the sketch, not by a separate pass over W).
    """
    if W.dim() < 2:
        raise ValueError(f"randomized_svd needs a matrix or a batch of matrices, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"randomized_svd needs a floating-point tensor, got {W.dtype}")
    m, n = W.shape[-2:]
    for name, value, minimum in (("k", k, 1), ("niter", niter, 0), ("oversample", oversample, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"randomized_svd: {name} must be an int >= {minimum}, got {value!r}")
    if k > min(m, n):
        raise ValueError(f"randomized_svd: k={k} exceeds min(m, n)={min(m, n)} for shape {tuple(W.shape)}")
    with torch.no_grad():
        U, S, V = ops.randomized_svd_op(W.detach(), k, niter, oversample, seed)
        U, V = canonicalize_signs(U, V)
    return U, S, V
