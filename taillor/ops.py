"""Op schemas of taillor, in one place, each with a fake (meta) implementation and one kernel per device.

Every op is a ``torch.library`` custom op, so torch.compile treats it as one opaque node and
``torch.library.opcheck`` can test it. The function body is the default kernel: the eager PyTorch one, which
runs on every device. CPU and CUDA register a kernel that asks :mod:`taillor.backends` whether the native
kernel (Triton, or the CUDA extension for ``randomized_svd``) should run instead.

Custom ops cannot return None, so outputs that were not asked for come back as empty tensors; the autograd
wiring in :mod:`taillor.functional` turns them back into None.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .eager import randomized_svd as eager_rsvd
from .eager import spectral_penalty as eager_penalty
from .eager import spectral_projection as eager_projection
from .eager import tail_adapter as eager_adapter


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


_DEVICE_KERNELS: dict = {}  # op -> its CPU/CUDA kernel, for run()
_PLAIN = (Tensor, torch.nn.Parameter)


def _register_device_kernel(op, kernel: Callable) -> None:
    def without_autocast(*args):
        # The callers cast the inputs to the autocast dtype themselves (TailLoRLinear.forward); autocast must not
        # recast the products inside a kernel, or the forward's dtypes would not match its backward's.
        device_type = next(a.device.type for a in args if isinstance(a, Tensor))
        if not torch.is_autocast_enabled(device_type):
            return kernel(*args)
        with torch.autocast(device_type, enabled=False):
            return kernel(*args)
    op.register_kernel("cpu", without_autocast)
    op.register_kernel("cuda", without_autocast)
    _DEVICE_KERNELS[op] = without_autocast


def _register_native(op, eager_fn: Callable, native_fn: Callable[[], Callable], wants_native: Callable) -> None:
    """CPU and CUDA kernels: the native kernel when the backend asks for it, else the eager one."""
    def kernel(*args):
        fn = native_fn() if wants_native(args[0].device) else eager_fn
        return fn(*args)
    _register_device_kernel(op, kernel)


def run(op, *args):
    """Call ``op``: through the dispatcher while torch.compile traces (one opaque node), else its device kernel.

    Outside compilation this is the same kernel the dispatcher would pick, minus the Python dispatch of a custom
    op (tens of microseconds a call, measured as the largest per-layer cost of small training steps on CPU).
    """
    kernel = _DEVICE_KERNELS.get(op)
    if kernel is None or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return op(*args)  # traced (compile, export, make_fx, fake tensors): the op and its fake impl
    tensors = [a for a in args if isinstance(a, Tensor)]
    if tensors[0].device.type not in ("cpu", "cuda") or any(type(t) not in _PLAIN for t in tensors):
        return op(*args)  # other devices (the default kernel) and tensor subclasses (DTensor, ...)
    return kernel(*args)


def _triton(name: str) -> Callable[[], Callable]:
    return lambda: getattr(backends.triton_kernels(), name)


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


def _tail_adapter_bwd_eager(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ):
    out = eager_adapter.tail_adapter_backward(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ)
    return tuple(_or_empty(t, dy) for t in out)


@custom_op("taillor::tail_adapter_bwd", mutates_args=())
def tail_adapter_bwd(dy: Tensor, x: Tensor, weight: Tensor, S: Tensor, P: Tensor, Q: Tensor, scale: float,
                     x_adapter: Optional[Tensor], need_dx: bool, need_dP: bool,
                     need_dQ: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _tail_adapter_bwd_eager(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ)


@tail_adapter_bwd.register_fake
def _(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty(0),
            P.new_empty(P.shape) if need_dP else dy.new_empty(0),
            Q.new_empty(Q.shape) if need_dQ else dy.new_empty(0),
            x.new_empty(x.shape) if (need_dx and x_adapter is not None) else dy.new_empty(0))


def _tail_adapter_bwd_triton():
    launcher = backends.triton_kernels().tail_adapter_backward

    def run(*args):
        return tuple(_or_empty(t, args[0]) for t in launcher(*args))
    return run


_register_native(tail_adapter_fwd, eager_adapter.tail_adapter_forward, _triton("tail_adapter_forward"),
                 backends.use_triton)
_register_native(tail_adapter_bwd, _tail_adapter_bwd_eager, _tail_adapter_bwd_triton, backends.use_triton)


# ---------------------------------------------------------------------------------------------------------------
# spectral_projection (full frame): P = V Aᵀ, Q = U B
# ---------------------------------------------------------------------------------------------------------------
@custom_op("taillor::spectral_projection_fwd", mutates_args=())
def spectral_projection_fwd(A: Tensor, B: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    return eager_projection.spectral_projection_forward(A, B, U, V)


@spectral_projection_fwd.register_fake
def _(A, B, U, V):
    return A.new_empty(V.shape[0], A.shape[0]), B.new_empty(U.shape[0], B.shape[1])


def _spectral_projection_bwd_with(launcher: Callable) -> Callable:
    def run(dP, dQ, U, V):
        dA, dB = launcher(dP, dQ, U, V)
        return _or_empty(dA, U), _or_empty(dB, U)
    return run


@custom_op("taillor::spectral_projection_bwd", mutates_args=())
def spectral_projection_bwd(dP: Optional[Tensor], dQ: Optional[Tensor], U: Tensor,
                            V: Tensor) -> tuple[Tensor, Tensor]:
    return _spectral_projection_bwd_with(eager_projection.spectral_projection_backward)(dP, dQ, U, V)


@spectral_projection_bwd.register_fake
def _(dP, dQ, U, V):
    dA = V.new_empty(dP.shape[1], V.shape[1]) if dP is not None else U.new_empty(0)
    dB = U.new_empty(U.shape[1], dQ.shape[1]) if dQ is not None else U.new_empty(0)
    return dA, dB


_register_native(spectral_projection_fwd, eager_projection.spectral_projection_forward,
                 _triton("spectral_projection_forward"), backends.use_triton)


def _projection_bwd_kernel(dP, dQ, U, V):
    if backends.use_triton(U.device):
        launcher = backends.triton_kernels().spectral_projection_backward
    else:
        launcher = eager_projection.spectral_projection_backward
    return _spectral_projection_bwd_with(launcher)(dP, dQ, U, V)


# dP may be None, so the device comes from the frame, not from the first argument.
_register_device_kernel(spectral_projection_bwd, _projection_bwd_kernel)


# ---------------------------------------------------------------------------------------------------------------
# spectral_penalty: c·(⟨B_hᵀ D B_h, A Aᵀ⟩ + ⟨Bᵀ B, A_h D A_hᵀ⟩), Gram form
# ---------------------------------------------------------------------------------------------------------------
def _penalty_fwd_with(launcher: Callable) -> Callable:
    def run(A, B, U, V, omega2, coeff):
        return launcher(A, B, U, V, omega2, coeff).to(A.dtype).reshape(())
    return run


@custom_op("taillor::spectral_penalty_fwd", mutates_args=())
def spectral_penalty_fwd(A: Tensor, B: Tensor, U: Optional[Tensor], V: Optional[Tensor], omega2: Tensor,
                         coeff: float) -> Tensor:
    return _penalty_fwd_with(eager_penalty.spectral_penalty_forward)(A, B, U, V, omega2, coeff)


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


_register_native(spectral_penalty_fwd, _penalty_fwd_with(eager_penalty.spectral_penalty_forward),
                 lambda: _penalty_fwd_with(backends.triton_kernels().spectral_penalty_forward),
                 backends.use_triton)
_register_native(spectral_penalty_bwd, eager_penalty.spectral_penalty_backward,
                 _triton("spectral_penalty_backward"), backends.use_triton)


# ---------------------------------------------------------------------------------------------------------------
# randomized_svd: the CUDA extension on CUDA tensors when built, the eager implementation everywhere else
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled extension ``taillor._C``, or None when it was not built."""
    try:
        from . import _C  # noqa: PLC0415 - optional native module
    except ImportError:
        return None
    return _C


def _cuda_extension_or_raise():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("taillor._C (the CUDA randomized-SVD extension) is not built: reinstall with a CUDA "
                           "build of torch and nvcc on PATH (pip install --no-build-isolation -e .), or set "
                           "TAILLOR_BACKEND=eager to use the PyTorch implementation")
    return ext


@custom_op("taillor::randomized_svd", mutates_args=())
def randomized_svd_op(A: Tensor, k: int, niter: int, oversample: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    return eager_rsvd.randomized_svd(A, k, niter, oversample, seed)


@randomized_svd_op.register_fake
def _(A, k, niter, oversample, seed):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    *batch, m, n = A.shape
    return (A.new_empty(*batch, m, k, dtype=dtype), A.new_empty(*batch, k, dtype=dtype),
            A.new_empty(*batch, n, k, dtype=dtype))


def _use_cuda_extension(device: torch.device) -> bool:
    backend = backends.requested_backend()
    if backend == "eager":
        return False
    return backend == "triton" or cuda_extension() is not None


@randomized_svd_op.register_kernel("cuda")
def _(A, k, niter, oversample, seed):
    if A.dtype == torch.float64 or not _use_cuda_extension(A.device):
        return eager_rsvd.randomized_svd(A, k, niter, oversample, seed)
    batch = A.shape[:-2]
    U, S, V = _cuda_extension_or_raise().randomized_svd(A.reshape(-1, *A.shape[-2:]).contiguous(), k, niter,
                                                         oversample, seed)
    return U.reshape(*batch, *U.shape[-2:]), S.reshape(*batch, k), V.reshape(*batch, *V.shape[-2:])
