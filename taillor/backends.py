"""Which kernel runs an op: the eager PyTorch kernel or a native one (Triton kernels, the CUDA extension).

``TAILLOR_BACKEND=eager|triton|auto`` (default ``auto``) is read at each call, so tests and users can switch it
at run time. ``auto`` uses Triton for CUDA tensors when Triton imports, eager otherwise. ``triton`` forces the
Triton kernels; on CPU tensors that needs ``TRITON_INTERPRET=1`` set before the kernels are first imported.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("eager", "triton", "auto")


def requested_backend() -> str:
    backend = os.environ.get("TAILLOR_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"TAILLOR_BACKEND must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def _import_kernels() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("taillor._kernels"), ""
    except Exception as err:  # triton missing or broken: reported by info() and at forced use
        return None, f"{type(err).__name__}: {err}"


def triton_kernels() -> ModuleType:
    """The Triton kernel package, or a RuntimeError that says why it cannot be used."""
    module, why = _import_kernels()
    if module is None:
        raise RuntimeError(f"the Triton kernels cannot be imported ({why}); install triton, or set "
                           "TAILLOR_BACKEND=eager")
    return module


def triton_status() -> str:
    module, why = _import_kernels()
    return "available" if module is not None else f"unavailable ({why})"


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernel should run an op on tensors of ``device``."""
    backend = requested_backend()
    if backend == "eager":
        return False
    if backend == "auto":
        return device.type == "cuda" and _import_kernels()[0] is not None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"TAILLOR_BACKEND=triton on a {device.type} tensor needs TRITON_INTERPRET=1 "
                           "(set before taillor's kernels are imported) or a CUDA tensor")
    triton_kernels()
    return True
