"""Op schemas of taillor, in one place, each with a fake (meta) implementation and one device kernel.

Every op is a ``torch.library`` custom op, so torch.compile treats it as one opaque node and
``torch.library.opcheck`` can test it. The function body is the default kernel (the eager PyTorch one). Each
device type an implementation is registered for (CPU, CUDA, ...) gets, through torch.library, one kernel that
asks the registry (:mod:`taillor.backends`) which implementation runs for the tensors' device type and dtype and
the op's arguments (predicates, priorities) under the current setting; every implementation returns exactly the
op's schema outputs. Custom ops cannot return None, so an output that was not asked for is an empty 1-D tensor;
the autograd wiring in :mod:`taillor.functional` turns it back into None.

:func:`call` is how :mod:`taillor.functional` runs an op: the same device kernel without the custom op's Python
dispatch (tens of microseconds a call, the largest per-layer cost of small CPU training steps), except while
something traces (torch.compile, export, fake tensors) or for tensor subclasses and other devices, which go
through the op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .eager import randomized_svd as eager_rsvd
from .eager import spectral_penalty as eager_penalty
from .eager import spectral_penalty_batched as eager_penalty_batched
from .eager import spectral_projection as eager_projection
from .eager import tail_adapter as eager_adapter

_DEVICE_KERNELS: dict = {}  # op -> its CPU/CUDA kernel, for call()
_PLAIN = (Tensor, torch.nn.Parameter)
_DIRECT_DEVICES = ("cpu", "cuda")


def _register_device_kernel(op, name: str, ref: int) -> None:
    """Device kernel of ``op``: the registry's implementation for args[ref]'s device type and dtype."""
    def kernel(*args):
        tensor = args[ref]
        fn = backends.impl_for(name, tensor.device.type, tensor.dtype, args)
        if not torch.is_autocast_enabled(tensor.device.type):
            return fn(*args)
        # The callers cast the inputs to the autocast dtype themselves (TailLoRLinear.forward); autocast must not
        # recast the products inside a kernel, or the forward's dtypes would not match its backward's.
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(*args)
    backends.bind(name, op, kernel)  # torch.library: this kernel for every device type the registry serves
    _DEVICE_KERNELS[op] = kernel


def call(op, *args):
    """Run ``op`` on ``args``: its device kernel directly, or the op itself when that is not safe (see module)."""
    kernel = _DEVICE_KERNELS.get(op)
    if (kernel is None or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or any(type(a) not in _PLAIN or a.device.type not in _DIRECT_DEVICES
                   for a in args if isinstance(a, Tensor))):
        return op(*args)
    return kernel(*args)


# ---------------------------------------------------------------------------------------------------------------
# tail_adapter: y = x Wᵀ + b + s·(x_a P) Qᵀ
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::tail_adapter_fwd", mutates_args=())
def tail_adapter_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], P: Tensor, Q: Tensor, scale: float,
                     x_adapter: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return eager_adapter.tail_adapter_forward(x, weight, bias, P, Q, scale, x_adapter)


@tail_adapter_fwd.register_fake
def _(x, weight, bias, P, Q, scale, x_adapter):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], P.shape[1])


@custom_op("taillor::tail_adapter_bwd", mutates_args=())
def tail_adapter_bwd(dy: Tensor, x: Tensor, weight: Tensor, S: Tensor, P: Tensor, Q: Tensor, scale: float,
                     x_adapter: Optional[Tensor], need_dx: bool, need_dP: bool,
                     need_dQ: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return eager_adapter.tail_adapter_backward(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ)


@tail_adapter_bwd.register_fake
def _(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty(0),
            P.new_empty(P.shape) if need_dP else dy.new_empty(0),
            Q.new_empty(Q.shape) if need_dQ else dy.new_empty(0),
            x.new_empty(x.shape) if (need_dx and x_adapter is not None) else dy.new_empty(0))


_register_device_kernel(tail_adapter_fwd, "tail_adapter_fwd", ref=0)
_register_device_kernel(tail_adapter_bwd, "tail_adapter_bwd", ref=0)


# ---------------------------------------------------------------------------------------------------------------
# spectral_projection (full frame): P = V Aᵀ, Q = U B
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::spectral_projection_fwd", mutates_args=())
def spectral_projection_fwd(A: Tensor, B: Tensor, U: Tensor, V: Tensor,
                            out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    return eager_projection.spectral_projection_forward(A, B, U, V, out_dtype)


@spectral_projection_fwd.register_fake
def _(A, B, U, V, out_dtype):
    dtype = A.dtype if out_dtype is None else out_dtype
    return A.new_empty(V.shape[0], A.shape[0], dtype=dtype), B.new_empty(U.shape[0], B.shape[1], dtype=dtype)


@custom_op("taillor::spectral_projection_bwd", mutates_args=())
def spectral_projection_bwd(dP: Optional[Tensor], dQ: Optional[Tensor], U: Tensor,
                            V: Tensor) -> tuple[Tensor, Tensor]:
    return eager_projection.spectral_projection_backward(dP, dQ, U, V)


@spectral_projection_bwd.register_fake
def _(dP, dQ, U, V):
    dA = V.new_empty(dP.shape[1], V.shape[1]) if dP is not None else U.new_empty(0)
    dB = U.new_empty(U.shape[1], dQ.shape[1]) if dQ is not None else U.new_empty(0)
    return dA, dB


_register_device_kernel(spectral_projection_fwd, "spectral_projection_fwd", ref=2)
_register_device_kernel(spectral_projection_bwd, "spectral_projection_bwd", ref=2)  # dP may be None: the frame


# ---------------------------------------------------------------------------------------------------------------
# spectral_penalty: c·(⟨B_hᵀ D B_h, A Aᵀ⟩ + ⟨Bᵀ B, A_h D A_hᵀ⟩), Gram form
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::spectral_penalty_fwd", mutates_args=())
def spectral_penalty_fwd(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                         coeff: float) -> Tensor:
    return eager_penalty.spectral_penalty_forward(A, B, U, V, omega2, coeff)


@spectral_penalty_fwd.register_fake
def _(A, B, U, V, omega2, coeff):
    return A.new_empty(())


@custom_op("taillor::spectral_penalty_bwd", mutates_args=())
def spectral_penalty_bwd(grad: Tensor, A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor],
                         omega2: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
    return eager_penalty.spectral_penalty_backward(grad, A, B, U, V, omega2, coeff)


@spectral_penalty_bwd.register_fake
def _(grad, A, B, U, V, omega2, coeff):
    return A.new_empty(A.shape), B.new_empty(B.shape)


_register_device_kernel(spectral_penalty_fwd, "spectral_penalty_fwd", ref=0)
_register_device_kernel(spectral_penalty_bwd, "spectral_penalty_bwd", ref=1)


# ---------------------------------------------------------------------------------------------------------------
# spectral_penalty_batched: L layers of one shape, (value, total = c·‖B A‖²) per layer
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::spectral_penalty_batched_fwd", mutates_args=())
def spectral_penalty_batched_fwd(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                                 coeff: float) -> tuple[Tensor, Tensor]:
    return eager_penalty_batched.spectral_penalty_batched_forward(A, B, U, V, omega2, coeff)


@spectral_penalty_batched_fwd.register_fake
def _(A, B, U, V, omega2, coeff):
    return A.new_empty(A.shape[:-2]), A.new_empty(A.shape[:-2])


@custom_op("taillor::spectral_penalty_batched_bwd", mutates_args=())
def spectral_penalty_batched_bwd(grad: Tensor, A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor],
                                 omega2: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
    return eager_penalty_batched.spectral_penalty_batched_backward(grad, A, B, U, V, omega2, coeff)


@spectral_penalty_batched_bwd.register_fake
def _(grad, A, B, U, V, omega2, coeff):
    return A.new_empty(A.shape), B.new_empty(B.shape)


_register_device_kernel(spectral_penalty_batched_fwd, "spectral_penalty_batched_fwd", ref=0)
_register_device_kernel(spectral_penalty_batched_bwd, "spectral_penalty_batched_bwd", ref=1)


# ---------------------------------------------------------------------------------------------------------------
# randomized_svd: the CUDA extension on CUDA tensors when built (and allowed), the eager implementation otherwise
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::randomized_svd", mutates_args=())
def randomized_svd_op(A: Tensor, k: int, niter: int, oversample: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    return eager_rsvd.randomized_svd(A, k, niter, oversample, seed)


@randomized_svd_op.register_fake
def _(A, k, niter, oversample, seed):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    *batch, m, n = A.shape
    return (A.new_empty(*batch, m, k, dtype=dtype), A.new_empty(*batch, k, dtype=dtype),
            A.new_empty(*batch, n, k, dtype=dtype))


_register_device_kernel(randomized_svd_op, "randomized_svd", ref=0)

OPS = {"tail_adapter_fwd": tail_adapter_fwd, "tail_adapter_bwd": tail_adapter_bwd,
       "spectral_projection_fwd": spectral_projection_fwd, "spectral_projection_bwd": spectral_projection_bwd,
       "spectral_penalty_fwd": spectral_penalty_fwd, "spectral_penalty_bwd": spectral_penalty_bwd,
       "spectral_penalty_batched_fwd": spectral_penalty_batched_fwd,
       "spectral_penalty_batched_bwd": spectral_penalty_batched_bwd,
       "randomized_svd": randomized_svd_op}
