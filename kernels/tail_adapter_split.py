"""Host launchers: the TailLoR adapter's split route — base products through cuBLAS, rank-r products in Triton.

Same math, outputs and precision rules as the fused route (kernels/tail_adapter.py, whose module docstring has the
derivation); only the work split differs. x (T, d_in), frozen W (d_out, d_in), P (d_in, r), Q (d_out, r), s:

    forward:   S = x_a P                    Triton pair kernel (one read of x_a)
               y = x Wᵀ + b                 cuBLAS (addmm), the base layer's own GEMM
               y += s · S Qᵀ                cuBLAS addmm_ (rank-r update: one more read and write of y)
    backward:  G = dy Q, dQ = s · dyᵀ S     one Triton launch (dQ reduces over tokens: split-K when needed)
               dP = s · x_aᵀ G              Triton, split-K over tokens when the grid is smaller than the GPU
               dx = dy W                    cuBLAS
               dx += s · G Pᵀ               cuBLAS addmm_ (dx_a = s · G Pᵀ instead when x_a is not x)

Why a second route: the fused kernel replaces cuBLAS for the base GEMM with a Triton GEMM, which may be slower than
cuBLAS on a given GPU; the split route keeps cuBLAS and pays two extra passes over y and dx (2·T·d_out + 2·T·d_in
elements). Which is faster is measured by ``benchmarks/gpu_check.sh``; until a GPU measurement exists the split
route is what ``TAILLOR_ADAPTER_IMPL=auto`` runs for layer steps below the onepass route's size rule
(taillor/backends/onepass.py). G is stored in x's dtype (rounded as eager PyTorch rounds it), so the
cuBLAS update takes it directly.
"""
import torch

from .checks import check_adapter_backward_inputs, check_adapter_inputs
from .launch import empty_output
from .pair_gemm import Term, launch_pair


def tail_adapter_split_forward(x, weight, bias, P, Q, scale, x_adapter=None):
    """Split-route forward: (y, S) with S = x_a P (Triton) and y = x Wᵀ + b + s·S Qᵀ (cuBLAS).

    Inputs, dtypes and outputs as :func:`taillor._kernels.tail_adapter_forward`.
    """
    T, d_in, d_out, r = check_adapter_inputs(x, weight, bias, P, Q, x_adapter)
    S = torch.empty((T, r), device=x.device, dtype=x.dtype)
    launch_pair(S, [Term(x if x_adapter is None else x_adapter, P)], site="adapter S = x_a P")
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    return y.addmm_(S, Q.t(), alpha=scale), S


def tail_adapter_split_backward(dy, x, weight, S, P, Q, scale, x_adapter=None,
                                need_dx=True, need_dP=True, need_dQ=True):
    """Split-route backward: (dx, dP, dQ, dx_adapter) as :func:`taillor._kernels.tail_adapter_backward`
    (empty 1-D tensors for outputs not requested, and for dx_adapter when x_adapter is None)."""
    T, d_in, d_out, r = check_adapter_backward_inputs(dy, x, weight, S, P, Q, x_adapter)
    need_G = need_dx or need_dP
    dx = dP = dQ = dx_adapter = empty_output(dy)
    G = torch.empty((T if need_G else 0, r), device=x.device, dtype=x.dtype)
    if need_dQ:
        dQ = torch.empty((d_out, r), device=x.device, dtype=Q.dtype)
    if need_G or need_dQ:
        launch_pair(G, [Term(dy, Q)], 1.0, dQ if need_dQ else None, [Term(dy.t(), S)], scale,
                    site="adapter G = dy Q, dQ = s dyT S")
    if need_dP:
        dP = torch.empty((d_in, r), device=x.device, dtype=P.dtype)
        launch_pair(dP, [Term((x if x_adapter is None else x_adapter).t(), G)], scale,
                    site="adapter dP = s x_aT G")
    if need_dx:
        dx = torch.mm(dy, weight)
        if x_adapter is None:
            dx.addmm_(G, P.t(), alpha=scale)
        else:
            dx_adapter = torch.mm(G, P.t()).mul_(scale)
    return dx, dP, dQ, dx_adapter
