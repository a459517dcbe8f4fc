"""Triton kernels of taillor, installed as ``taillor._kernels`` (the bottom layer: tensors and scalars in,
tensors out; no autograd, nothing from ``taillor``).

Launchers (each returns exactly its op's schema outputs, see taillor.ops):
    tail_adapter_forward, tail_adapter_backward              fused route: one Triton GEMM for base + rank r
    tail_adapter_split_forward, tail_adapter_split_backward  split route: cuBLAS base, Triton rank-r products
    tail_adapter_onepass_forward, tail_adapter_onepass_backward  onepass route: fused forward, dy read once and
                                                             dP folded into the dx GEMM in the backward
    spectral_projection_forward, spectral_projection_backward  P = V Aᵀ, Q = U B and their gradients
    spectral_penalty_forward, spectral_penalty_backward      the Gram-form spectral penalty
    spectral_penalty_batched_forward, _backward              the same for L same-shaped layers, with ‖B A‖²

One job per module: each op file (tail_adapter, tail_adapter_split, tail_adapter_onepass, spectral_projection, spectral_penalty) holds
its ``@triton.jit`` kernel and host launcher; ``pair_gemm`` is the shared GEMM engine (two tall-skinny products
per launch, and the inner loop the fused adapter GEMM reuses); ``checks`` validates every launcher's arguments;
``launch`` holds the launch rules (interpreter read at launch, device guard, tile configs, bucketed tuning,
recording for the ahead-of-time check). Without TRITON_INTERPRET=1 the launchers need CUDA tensors; with it they
run on the CPU.
"""
from .spectral_penalty import spectral_penalty_backward, spectral_penalty_forward
from .spectral_penalty_batched import spectral_penalty_batched_backward, spectral_penalty_batched_forward
from .spectral_projection import spectral_projection_backward, spectral_projection_forward
from .tail_adapter import tail_adapter_backward, tail_adapter_forward
from .tail_adapter_onepass import tail_adapter_onepass_backward, tail_adapter_onepass_forward
from .tail_adapter_split import tail_adapter_split_backward, tail_adapter_split_forward

__all__ = [
    "spectral_penalty_backward",
    "spectral_penalty_batched_backward",
    "spectral_penalty_batched_forward",
    "spectral_penalty_forward",
    "spectral_projection_backward",
    "spectral_projection_forward",
    "tail_adapter_backward",
    "tail_adapter_forward",
    "tail_adapter_onepass_backward",
    "tail_adapter_onepass_forward",
    "tail_adapter_split_backward",
    "tail_adapter_split_forward",
]
