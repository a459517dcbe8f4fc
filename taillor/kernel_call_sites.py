"""The Triton launches taillor makes at run time, recorded on meta tensors for ``taillor check-kernels``.

Each call site runs a real launcher (kernels/) under :func:`taillor._kernels.launch.recording`, on meta tensors
shaped like a real model layer, so the recorded launches carry exactly the arguments, dtypes and flags of run
time: the compile check then specializes them the way Triton's launcher does (pointer alignment, integers
divisible by 16 or equal to 1) instead of guessing a signature.

Shapes: a Llama-7B projection (4096 x 4096, rank 16) with a token count divisible by 16 (8192) in every
activation dtype, and an odd one (8191) in bf16, the training dtype (it only changes the integer attributes);
the frame and the penalty in float32 (the adapter's parameters are float32 in every TailLoRLinear, whatever the
base weight's dtype). Split-K decisions are made for a 132-SM GPU (H100/H200), as they would be there.
"""
from __future__ import annotations

import torch

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKENS = {"T%16=0": 8192, "odd T": 8191}
SM_COUNT = 132
D_IN = D_OUT = 4096
RANK = 16
HEAD = 256


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _adapter_sites(K, dtype, tokens):
    x, dy = _meta(tokens, D_IN, dtype=dtype), _meta(tokens, D_OUT, dtype=dtype)
    W, b = _meta(D_OUT, D_IN, dtype=dtype), _meta(D_OUT, dtype=dtype)
    P, Q, S = _meta(D_IN, RANK, dtype=dtype), _meta(D_OUT, RANK, dtype=dtype), _meta(tokens, RANK, dtype=dtype)
    sites = []
    for route, (forward, backward) in {"fused": (K.tail_adapter_forward, K.tail_adapter_backward),
                                       "split": (K.tail_adapter_split_forward, K.tail_adapter_split_backward)}.items():
        for bias in (None, b):
            sites.append((f"{route} forward", lambda f=forward, bias=bias: f(x, W, bias, P, Q, 2.0)))
        for x_adapter in (None, x):
            sites.append((f"{route} backward", lambda g=backward, xa=x_adapter: g(dy, x, W, S, P, Q, 2.0, xa)))
    return sites


def _frame_sites(K, dtype):
    k = D_IN
    A, B, U, V = _meta(RANK, k), _meta(k, RANK), _meta(D_OUT, k), _meta(D_IN, k)
    dP, dQ = _meta(D_IN, RANK, dtype=dtype), _meta(D_OUT, RANK, dtype=dtype)
    return [("projection forward", lambda: K.spectral_projection_forward(A, B, U, V, dtype)),
            ("projection backward", lambda: K.spectral_projection_backward(dP, dQ, U, V))]


def _penalty_sites(K):
    k = D_IN
    w_full, w_head = _meta(k), _meta(HEAD)
    A, B = _meta(RANK, k), _meta(k, RANK)
    Ah, Bh, Uh, Vh = _meta(RANK, D_IN), _meta(D_OUT, RANK), _meta(D_OUT, HEAD), _meta(D_IN, HEAD)
    g = _meta(())
    return [("penalty full", lambda: K.spectral_penalty_forward(A, B, None, None, w_full, 1.0)),
            ("penalty full grad", lambda: K.spectral_penalty_backward(g, A, B, None, None, w_full, 1.0)),
            ("penalty head", lambda: K.spectral_penalty_forward(Ah, Bh, Uh, Vh, w_head, 1.0)),
            ("penalty head grad", lambda: K.spectral_penalty_backward(g, Ah, Bh, Uh, Vh, w_head, 1.0))]


def record_call_sites():
    """[(call site, dtype label, launch)] for every launch of every call site (see the module docstring)."""
    from ._kernels import launch
    import taillor._kernels as K

    sites = []
    for dtype in ACTIVATION_DTYPES:
        label = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        for tokens_label, tokens in TOKENS.items():
            if tokens % 16 and dtype != torch.bfloat16:
                continue
            sites += [(name, f"{label} {tokens_label}", fn) for name, fn in _adapter_sites(K, dtype, tokens)]
        sites += [(name, f"fp32 -> {label}", fn) for name, fn in _frame_sites(K, dtype)]
    sites += [(name, "fp32", fn) for name, fn in _penalty_sites(K)]
    recorded = []
    for name, label, fn in sites:
        with launch.recording(sm_count=SM_COUNT) as launches:
            fn()
        recorded += [(name, label, rec) for rec in launches]
    return recorded
