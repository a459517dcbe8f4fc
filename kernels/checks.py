"""Host-side argument checks of the launchers: every launcher validates its inputs here before any launch, and a
bad input raises ValueError naming the argument and the offending shape, dtype, stride or device.

The generic checks (2-D, dtype, row-major, one device) come first, then one function per op that checks all of its
launcher's arguments and returns the sizes the launcher needs.
"""
from __future__ import annotations

import torch

from .launch import FLOAT_DTYPES, interpreting, is_recording


def check_device(**tensors) -> None:
    """All tensors on one device: CUDA, or any device under the interpreter (how CI runs the kernels)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all inputs must share a device")
    if first.type != "cuda" and not interpreting() and not is_recording():
        raise ValueError(f"{first_name} is on {first}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")


def check_2d(name, t, rows=None, cols=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = (rows if rows is not None else "*", cols if cols is not None else "*")
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({want[0]}, {want[1]})")


def check_dtype(name, t, dtype=None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but must match {dtype}")


def check_row_major(name, t) -> None:
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {tuple(t.stride())}); "
                         "call .contiguous() first")


def check_vector(name, t) -> None:
    """A 1-D float tensor with unit stride."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    check_dtype(name, t)
    if t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (stride {t.stride(0)}); call .contiguous() first")


# ---------------------------------------------------------------------------------------------------------------
# tail adapter (both routes)
# ---------------------------------------------------------------------------------------------------------------
def check_adapter_inputs(x, weight, bias, P, Q, x_adapter):
    """Validate the adapter forward's inputs (both routes); returns (T, d_in, d_out, r)."""
    check_2d("x", x)
    T, d_in = x.shape
    check_2d("weight", weight, cols=d_in)
    d_out = weight.shape[0]
    check_2d("P", P, rows=d_in)
    r = P.shape[1]
    if r < 1:
        raise ValueError(f"P has shape {tuple(P.shape)}: rank must be >= 1")
    check_2d("Q", Q, rows=d_out, cols=r)
    check_dtype("x", x)
    for name, t in (("weight", weight), ("P", P), ("Q", Q)):
        check_dtype(name, t, x.dtype)
    check_row_major("x", x)
    check_row_major("weight", weight)
    if x_adapter is not None:
        check_2d("x_adapter", x_adapter, rows=T, cols=d_in)
        check_dtype("x_adapter", x_adapter, x.dtype)
        check_row_major("x_adapter", x_adapter)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        check_dtype("bias", bias, x.dtype)
        if d_out > 1 and bias.stride(0) != 1:
            raise ValueError(f"bias must be contiguous (stride {bias.stride(0)}); call .contiguous() first")
    check_device(x=x, weight=weight, bias=bias, P=P, Q=Q, x_adapter=x_adapter)
    return T, d_in, d_out, r


def check_adapter_backward_inputs(dy, x, weight, S, P, Q, x_adapter):
    """Validate the adapter backward's inputs (both routes); returns (T, d_in, d_out, r)."""
    T, d_in, d_out, r = check_adapter_inputs(x, weight, None, P, Q, x_adapter)
    check_2d("dy", dy, rows=T, cols=d_out)
    check_dtype("dy", dy, x.dtype)
    check_row_major("dy", dy)
    check_2d("S", S, rows=T, cols=r)
    check_dtype("S", S, x.dtype)
    check_device(dy=dy, x=x, S=S)
    return T, d_in, d_out, r


# ---------------------------------------------------------------------------------------------------------------
# spectral projection
# ---------------------------------------------------------------------------------------------------------------
def check_projection_inputs(A, B, U, V, out_dtype):
    """Validate the projection forward's inputs; returns (k, r, out_dtype) with out_dtype defaulted to U's."""
    check_2d("U", U)
    k = U.shape[1]
    check_2d("V", V, cols=k)
    check_2d("A", A, cols=k)
    r = A.shape[0]
    check_2d("B", B, rows=k, cols=r)
    check_dtype("U", U)
    for name, t in (("V", V), ("A", A), ("B", B)):
        check_dtype(name, t, U.dtype)
    out_dtype = U.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    check_device(A=A, B=B, U=U, V=V)
    return k, r, out_dtype


def check_projection_backward_inputs(dP, dQ, U, V):
    """Validate the projection backward's inputs; returns (k, the upstream gradients' dtype or None)."""
    check_2d("U", U)
    k = U.shape[1]
    check_2d("V", V, cols=k)
    check_dtype("U", U)
    check_dtype("V", V, U.dtype)
    r = None
    grad_dtype = None
    if dP is not None:
        check_2d("dP", dP, rows=V.shape[0])
        check_dtype("dP", dP)
        r, grad_dtype = dP.shape[1], dP.dtype
    if dQ is not None:
        check_2d("dQ", dQ, rows=U.shape[0], cols=r)
        check_dtype("dQ", dQ, grad_dtype)
        grad_dtype = dQ.dtype
    check_device(dP=dP, dQ=dQ, U=U, V=V)
    return k, grad_dtype


# ---------------------------------------------------------------------------------------------------------------
# spectral penalty
# ---------------------------------------------------------------------------------------------------------------
def check_penalty_inputs(A, B, U, V, omega2):
    """Validate the penalty's inputs; returns (full, r, k or h): full mode when U = V = None."""
    check_2d("A", A)
    r = A.shape[0]
    check_2d("B", B, cols=r)
    if r < 1:
        raise ValueError(f"A has shape {tuple(A.shape)}: rank must be >= 1")
    check_dtype("A", A)
    check_dtype("B", B, A.dtype)
    if (U is None) != (V is None):
        raise ValueError("U and V must both be given (head mode) or both be None (full mode)")
    check_vector("omega2", omega2)
    if U is None:
        k = A.shape[1]
        if B.shape[0] != k:
            raise ValueError(f"B has shape {tuple(B.shape)}, expected ({k}, {r}) to match A {tuple(A.shape)}")
        if omega2.shape[0] != k:
            raise ValueError(f"omega2 has length {omega2.shape[0]}, expected k = {k}")
        check_device(A=A, B=B, omega2=omega2)
        return True, r, k
    d_out, d_in = B.shape[0], A.shape[1]
    check_2d("U", U, rows=d_out)
    h = U.shape[1]
    check_2d("V", V, rows=d_in, cols=h)
    check_dtype("U", U)  # the frame may be stored narrower than A and B: the launchers read it in A's dtype
    check_dtype("V", V, U.dtype)
    if omega2.shape[0] != h:
        raise ValueError(f"omega2 has length {omega2.shape[0]}, expected h = {h}")
    check_device(A=A, B=B, U=U, V=V, omega2=omega2)
    return False, r, h


def check_penalty_grad(grad, A) -> None:
    """The upstream gradient of the penalty: a one-element tensor on A's device."""
    if not isinstance(grad, torch.Tensor) or grad.numel() != 1:
        raise ValueError(f"grad must be a one-element tensor, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    check_device(grad=grad, A=A)
