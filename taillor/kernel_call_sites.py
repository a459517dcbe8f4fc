"""The Triton launches taillor makes at run time, recorded on meta tensors for ``taillor check-kernels``.

Every Triton-family implementation in the backend registry (:mod:`taillor.backends`) is called here with the
arguments its op receives at run time, on meta tensors shaped like a real model layer, under
:func:`taillor._kernels.launch.recording`: the recorded launches carry exactly the arguments, dtypes and flags
of run time, so the compile check specializes them the way Triton's launcher does (pointer alignment, integers
divisible by 16 or equal to 1) instead of guessing a signature. A backend registered for an op listed here is
checked without any change to this file.

Shapes: a Llama-7B projection (4096 x 4096, rank 16) with a token count divisible by 16 (8192) in every
activation dtype, and an odd one (8191) in bf16, the training dtype (it only changes the integer attributes);
the adapter with both factor layouts (full frame: P contiguous; head frame: P = Aᵀ, strided);
the frame and the penalty in float32 (the adapter's parameters are float32 in every TailLoRLinear, whatever the
base weight's dtype). Split-K decisions are made for a 132-SM GPU (H100/H200), as they would be there.
"""
from __future__ import annotations

import torch

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_LABELS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TOKENS = {"T%16=0": 8192, "odd T": 8191}
SM_COUNT = 132
D_IN = D_OUT = 4096
RANK = 16
HEAD = 256


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _adapter_calls(dtype, tokens, layouts=("full", "head")):
    """{op: [(what, args)]} of the adapter op in ``dtype`` over ``tokens`` tokens, for the factor layouts of
    ``layouts``: the full frame's P and Q (contiguous: P = V Aᵀ, Q = U B come out of the projection) and the head
    frame's (P = Aᵀ, a transposed view of the (r, d_in) parameter cast to ``dtype``; Q = B contiguous)."""
    x, dy = _meta(tokens, D_IN, dtype=dtype), _meta(tokens, D_OUT, dtype=dtype)
    W, b = _meta(D_OUT, D_IN, dtype=dtype), _meta(D_OUT, dtype=dtype)
    Q, S = _meta(D_OUT, RANK, dtype=dtype), _meta(tokens, RANK, dtype=dtype)
    factors = {"full": _meta(D_IN, RANK, dtype=dtype), "head": _meta(RANK, D_IN, dtype=dtype).t()}
    calls = {"tail_adapter_fwd": [], "tail_adapter_bwd": []}
    for layout in layouts:
        P = factors[layout]
        calls["tail_adapter_fwd"] += [(f"forward ({layout} P)", (x, W, bias, P, Q, 2.0, None)) for bias in (None, b)]
        calls["tail_adapter_bwd"] += [(f"backward ({layout} P)", (dy, x, W, S, P, Q, 2.0, xa, True, True, True))
                                      for xa in (None, x)]
    return calls


def _projection_calls(dtype):
    """{op: [(what, args)]} of the full-frame projection of float32 factors into ``dtype``."""
    k = D_IN
    A, B, U, V = _meta(RANK, k), _meta(k, RANK), _meta(D_OUT, k), _meta(D_IN, k)
    dP, dQ = _meta(D_IN, RANK, dtype=dtype), _meta(D_OUT, RANK, dtype=dtype)
    return {"spectral_projection_fwd": [("projection forward", (A, B, U, V, dtype))],
            "spectral_projection_bwd": [("projection backward", (dP, dQ, U, V))]}


def _penalty_calls():
    """{op: [(what, args)]} of the penalty, full and head frames, float32."""
    k = D_IN
    w_full, w_head = _meta(k), _meta(HEAD)
    A, B = _meta(RANK, k), _meta(k, RANK)
    Ah, Bh, Uh, Vh = _meta(RANK, D_IN), _meta(D_OUT, RANK), _meta(D_OUT, HEAD), _meta(D_IN, HEAD)
    g = _meta(())
    return {"spectral_penalty_fwd": [("penalty full", (A, B, None, None, w_full, 1.0)),
                                     ("penalty head", (Ah, Bh, Uh, Vh, w_head, 1.0))],
            "spectral_penalty_bwd": [("penalty full grad", (g, A, B, None, None, w_full, 1.0)),
                                     ("penalty head grad", (g, Ah, Bh, Uh, Vh, w_head, 1.0))],
            **_batched_penalty_calls()}


def _batched_penalty_calls(layers: int = 4):
    """{op: [(what, args)]} of the batched penalty (a group of ``layers`` layers), full and head frames."""
    k, L = D_IN, layers
    w_full, w_head, g = _meta(L, k), _meta(L, HEAD), _meta(L)
    A, B = _meta(L, RANK, k), _meta(L, k, RANK)
    Ah, Bh, Uh, Vh = _meta(L, RANK, D_IN), _meta(L, D_OUT, RANK), _meta(L, D_OUT, HEAD), _meta(L, D_IN, HEAD)
    return {"spectral_penalty_batched_fwd": [("batched penalty full", (A, B, None, None, w_full, 1.0)),
                                             ("batched penalty head", (Ah, Bh, Uh, Vh, w_head, 1.0))],
            "spectral_penalty_batched_bwd": [("batched penalty full grad", (g, A, B, None, None, w_full, 1.0)),
                                             ("batched penalty head grad", (g, Ah, Bh, Uh, Vh, w_head, 1.0))]}


def _label(impl, what: str) -> str:
    """The call site's name: the adapter's route, and a backend's name where the op has several."""
    if impl.route is not None:
        return f"{impl.route} {what}"
    return what if impl.backend == "triton" else f"{what} [{impl.backend}]"


def call_sites() -> list[tuple[str, str, object]]:
    """[(call site, dtype label, call)] of every Triton-family implementation of every op (see the module)."""
    from . import backends

    calls = []  # (dtype label, {op: [(what, args)]})
    for dtype in ACTIVATION_DTYPES:
        label = DTYPE_LABELS[dtype]
        for tokens_label, tokens in TOKENS.items():
            if tokens % 16 and dtype != torch.bfloat16:
                continue
            # The odd token count only changes integer attributes: one factor layout is enough there.
            layouts = ("full", "head") if tokens % 16 == 0 else ("head",)
            calls.append((f"{label} {tokens_label}", _adapter_calls(dtype, tokens, layouts)))
        calls.append((f"fp32 -> {label}", _projection_calls(dtype)))
    calls.append(("fp32", _penalty_calls()))
    sites = []
    for label, by_op in calls:
        for op, op_calls in by_op.items():
            for impl in backends.implementations(op):
                if impl.family != "triton":
                    continue
                for what, args in op_calls:
                    sites.append((_label(impl, what), label, lambda fn=impl.load(), args=args: fn(*args)))
    return sites


def record_call_sites():
    """[(call site, dtype label, launch)] for every launch of every call site (see the module docstring)."""
    from ._kernels import launch

    recorded = []
    for name, label, fn in call_sites():
        with launch.recording(sm_count=SM_COUNT) as launches:
            fn()
        recorded += [(name, label, rec) for rec in launches]
    return recorded
