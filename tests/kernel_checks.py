"""Float64-oracle checks of the Triton launchers, shared by the interpreter tests (test_kernels_direct.py, CPU) and
the compiled-kernel tests (test_kernels_compiled.py, marked `gpu`).

Tolerance rule (flash-attention style, DESIGN §7): the kernel's max error against the float64 oracle must be at
most twice the error of the same computation done eagerly by PyTorch in the input dtype on the same device, plus
FLOOR[dtype] (tests/conftest.py) times the output's scale.
"""
from __future__ import annotations

import torch

from conftest import FLOOR

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def assert_close(name, out, eager, oracle, dtype):
    """|out - oracle| <= 2 |eager - oracle| + floor · scale (max norms)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    out, eager, oracle = out.detach().cpu().double(), eager.detach().cpu().double(), oracle.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - oracle).abs().max().item() if out.numel() else 0.0
    err_eager = (eager - oracle).abs().max().item() if out.numel() else 0.0
    scale = oracle.abs().max().item() if out.numel() else 0.0
    bound = 2 * err_eager + FLOOR[dtype] * max(scale, 1e-30)
    assert err <= bound, f"{name} ({dtype}): error {err:.3e} > bound {bound:.3e} (eager {err_eager:.3e})"


def _d(t):
    return None if t is None else t.detach().cpu().double()


def is_empty(t):
    """The op schemas' "not computed" output: an empty 1-D tensor."""
    return t.dim() == 1 and t.numel() == 0


# ---------------------------------------------------------------------------------------------------------
# tail adapter


def adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter, device="cpu", strided=False, seed=0):
    """x, W, b, P, Q, x_adapter; with ``strided`` P and Q are transposed views (P = Aᵀ as in head mode)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    x = rnd(T, d_in)
    W = rnd(d_out, d_in, std=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    if strided:
        P, Q = rnd(r, d_in, std=d_in ** -0.5).t(), rnd(r, d_out, std=0.5).t()
    else:
        P, Q = rnd(d_in, r, std=d_in ** -0.5), rnd(d_out, r, std=0.5)
    xa = rnd(T, d_in) if adapter else None
    return x, W, b, P, Q, xa


def check_tail_adapter(forward, backward, T, d_in, d_out, r, dtype, bias, adapter, device="cpu", strided=False):
    """Forward and backward of one adapter route against the float64 oracle (every output)."""
    s = 0.75
    x, W, b, P, Q, xa = adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter, device, strided)
    xa_ = x if xa is None else xa

    y, S = forward(x, W, b, P, Q, s, xa)
    assert y.dtype == dtype and S.dtype == dtype and y.device == x.device
    S64 = _d(xa_) @ _d(P)
    y64 = _d(x) @ _d(W).T + s * S64 @ _d(Q).T + (0 if b is None else _d(b))
    S_e = xa_ @ P
    y_e = x @ W.T + s * (S_e @ Q.T) + (0 if b is None else b)
    assert_close("S", S, S_e, S64, dtype)
    assert_close("y", y, y_e, y64, dtype)

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(T, d_out, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    dx, dP, dQ, dxa = backward(dy, x, W, S, P, Q, s, xa, True, True, True)
    G64 = _d(dy) @ _d(Q)
    G_e = dy @ Q
    assert dP.dtype == P.dtype and dQ.dtype == Q.dtype and dx.dtype == dtype
    assert_close("dQ", dQ, s * (dy.T @ S), s * _d(dy).T @ _d(S), dtype)
    assert_close("dP", dP, s * (xa_.T @ G_e), s * _d(xa_).T @ G64, dtype)
    if xa is None:
        assert is_empty(dxa)
        assert_close("dx", dx, dy @ W + s * (G_e @ P.T), _d(dy) @ _d(W) + s * G64 @ _d(P).T, dtype)
    else:
        assert_close("dx", dx, dy @ W, _d(dy) @ _d(W), dtype)
        assert_close("dx_adapter", dxa, s * (G_e @ P.T), s * G64 @ _d(P).T, dtype)


# ---------------------------------------------------------------------------------------------------------
# spectral projection


def check_spectral_projection(forward, backward, k, d_in, d_out, r, dtype, device="cpu", out_dtype=None):
    """P = V Aᵀ, Q = U B (in ``out_dtype``) and dA = dPᵀ V, dB = Uᵀ dQ against the float64 oracle."""
    g = torch.Generator().manual_seed(2)
    U, V, A, B = (torch.randn(*sh, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                  for sh in ((d_out, k), (d_in, k), (r, k), (k, r)))
    grad_dtype = out_dtype or dtype
    dP, dQ = (torch.randn(*sh, generator=g, dtype=torch.float64).to(device=device, dtype=grad_dtype)
              for sh in ((d_in, r), (d_out, r)))
    P, Q = forward(A, B, U, V) if out_dtype is None else forward(A, B, U, V, out_dtype)
    tol_dtype = grad_dtype if grad_dtype.itemsize < dtype.itemsize else dtype  # the coarser of the two
    assert P.dtype == grad_dtype and Q.dtype == grad_dtype
    assert_close("P", P, (V @ A.T).to(grad_dtype), _d(V) @ _d(A).T, tol_dtype)
    assert_close("Q", Q, (U @ B).to(grad_dtype), _d(U) @ _d(B), tol_dtype)
    dA, dB = backward(dP, dQ, U, V)
    assert dA.is_contiguous() and dB.is_contiguous() and dA.dtype == dtype and dB.dtype == dtype
    assert_close("dA", dA, dP.to(dtype).T @ V, _d(dP).T @ _d(V), tol_dtype)
    assert_close("dB", dB, U.T @ dQ.to(dtype), _d(U).T @ _d(dQ), tol_dtype)


# ---------------------------------------------------------------------------------------------------------
# spectral penalty


def penalty_eager(A, B, U, V, w, c):
    """The penalty in Gram form, computed by PyTorch in the inputs' dtype (float64 inputs: the oracle)."""
    w = w.to(A.dtype)
    if U is None:
        Bh, Ah = B, A
    else:
        Bh, Ah = U.T @ B, A @ V
    return c * ((Bh.T @ (w[:, None] * Bh)) * (A @ A.T)).sum() + c * ((B.T @ B) * ((Ah * w) @ Ah.T)).sum()


def penalty_grads_eager(A, B, U, V, w, c, g):
    """Closed-form gradients (module docstring of kernels/spectral_penalty.py), in the inputs' dtype."""
    w = w.to(A.dtype)
    if U is None:
        dA = (B.T @ (w[:, None] * B)) @ A + ((B.T @ B) @ A) * w
        dB = w[:, None] * (B @ (A @ A.T)) + B @ ((A * w) @ A.T)
    else:
        Bh, Ah = U.T @ B, A @ V
        dA = (Bh.T @ (w[:, None] * Bh)) @ A + (((B.T @ B) @ Ah) * w) @ V.T
        dB = U @ (w[:, None] * Bh @ (A @ A.T)) + B @ ((Ah * w) @ Ah.T)
    return 2 * c * g * dA, 2 * c * g * dB


def penalty_inputs(mode, r, dtype, device="cpu", seed=3):
    k, d_in, d_out, h = 50, 96, 70, 12
    g = torch.Generator().manual_seed(seed)
    if mode == "full":
        A = torch.randn(r, k, generator=g, dtype=torch.float64)
        B = torch.randn(k, r, generator=g, dtype=torch.float64)
        U = V = None
        w = torch.rand(k, generator=g, dtype=torch.float64)
        w[k // 2:] = 0  # "head" weighting: zeros on the tail
    else:
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(d_out, h, generator=g, dtype=torch.float64))[0].to(device, dtype)
        V = torch.linalg.qr(torch.randn(d_in, h, generator=g, dtype=torch.float64))[0].to(device, dtype)
        w = torch.rand(h, generator=g, dtype=torch.float64)
    return A.to(device, dtype), B.to(device, dtype), U, V, w.float().to(device)


def check_spectral_penalty(forward, backward, mode, r, dtype, device="cpu"):
    A, B, U, V, w = penalty_inputs(mode, r, dtype, device)
    c, g = 0.3, 1.7
    val = forward(A, B, U, V, w, c)
    assert val.shape == () and val.dtype == dtype
    oracle = penalty_eager(_d(A), _d(B), _d(U), _d(V), _d(w), c)
    assert_close("value", val, penalty_eager(A, B, U, V, w, c), oracle, dtype)
    dA, dB = backward(torch.tensor(g, device=device), A, B, U, V, w, c)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dtype and dB.dtype == dtype
    dA64, dB64 = penalty_grads_eager(_d(A), _d(B), _d(U), _d(V), _d(w), c, g)
    dA_e, dB_e = penalty_grads_eager(A, B, U, V, w, c, g)
    assert_close("dA", dA, dA_e, dA64, dtype)
    assert_close("dB", dB, dB_e, dB64, dtype)
