"""Triton launchers: spectral projection between the SVD frame and the rank-r LoRA factors (full frame).

Math. With the frozen frame U (d_out, k), V (d_in, k) and the trainable spectral factors A (r, k), B (k, r),
the full-frame adapter runs as a plain rank-r LoRA with

    P = V Aᵀ   (d_in, r)        Q = U B   (d_out, r).

Backward: P and Q are linear in A and B, so for upstream gradients dP, dQ

    dL/dA[i, j] = Σ_a dP[a, i] V[a, j]          →  dA = dPᵀ V   (r, k)
    dL/dB       = Uᵀ dQ                         →  dB = Uᵀ dQ   (k, r).

U and V are frozen, so they get no gradient. All four products are tall-skinny; each direction is one launch of
the pair kernel (kernels/pair_gemm.py), which computes two such products at once.
"""
import torch

from .checks import check_projection_backward_inputs, check_projection_inputs
from .launch import empty_output
from .pair_gemm import Term, launch_pair


def spectral_projection_forward(A, B, U, V, out_dtype=None):
    """P = V Aᵀ (d_in, r) and Q = U B (d_out, r), in one launch.

    Shapes: A (r, k), B (k, r), U (d_out, k), V (d_in, k); all one dtype (float32, float16 or bfloat16),
    any strides, one CUDA device (any device under TRITON_INTERPRET=1). P and Q come back contiguous in
    ``out_dtype`` (default: the inputs' dtype); accumulation is in fp32. With a 16-bit ``out_dtype`` (the
    activation dtype of a bf16/fp16 layer) the operands are rounded to it and multiplied on tensor cores: the
    products are rounded to that dtype on output anyway.
    """
    k, r, out_dtype = check_projection_inputs(A, B, U, V, out_dtype)
    P = torch.empty((V.shape[0], r), device=U.device, dtype=out_dtype)
    Q = torch.empty((U.shape[0], r), device=U.device, dtype=out_dtype)
    dot = out_dtype if out_dtype.itemsize < U.dtype.itemsize else U.dtype
    launch_pair(P, [Term(V, A.t())], 1.0, Q, [Term(U, B)], 1.0, dot_dtype=dot, site="projection fwd")
    return P, Q


def spectral_projection_backward(dP, dQ, U, V):
    """dA = dPᵀ V (r, k) and dB = Uᵀ dQ (k, r), in one launch (see the module docstring for the derivation).

    Shapes: dP (d_in, r) or None, dQ (d_out, r) or None, U (d_out, k), V (d_in, k); U and V one dtype, dP and
    dQ that dtype or a 16-bit one (the gradient of a projection made with ``out_dtype``; then the products run
    on tensor cores in it). Any strides. A None upstream gradient gives an empty 1-D output (the op schema).
    dA and dB come back contiguous in U's dtype; accumulation is in fp32. dA is computed as its transpose
    Vᵀ dP (a tall-skinny product over d_in) and stored through transposed strides.
    """
    k, grad_dtype = check_projection_backward_inputs(dP, dQ, U, V)
    dA = empty_output(U) if dP is None else torch.empty((dP.shape[1], k), device=U.device, dtype=U.dtype)
    dB = empty_output(U) if dQ is None else torch.empty((k, dQ.shape[1]), device=U.device, dtype=U.dtype)
    if dP is None and dQ is None:
        return dA, dB
    dot = grad_dtype if grad_dtype.itemsize < U.dtype.itemsize else U.dtype
    problems = []
    if dP is not None:
        problems += [dA.t(), [Term(V.t(), dP)], 1.0]
    if dQ is not None:
        problems += [dB, [Term(U.t(), dQ)], 1.0]
    launch_pair(*problems, dot_dtype=dot, site="projection bwd")
    return dA, dB
