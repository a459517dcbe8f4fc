"""taillor.info(): what is installed and which kernels will run."""
from __future__ import annotations

import platform

import torch

from . import backends
from ._version import __version__


def info() -> dict:
    """Versions, devices and backends: {"taillor", "torch", "triton", "python", "cuda_available", "device",
    "backend", "adapter_route", "triton_kernels", "cuda_extension": "built" | "missing", "ops": {op: [backends]},
    ...}."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "taillor": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "backend": backends.requested_backend(),
        "triton_kernels": backends.triton_status(),
        "cuda_extension": "built" if backends.cuda_extension() is not None else "missing",
        "adapter_route": backends.adapter_route(),
        "backends": {"eager": "every device",
                     "triton": "CUDA tensors (CPU under TRITON_INTERPRET=1)" if triton_version else "unavailable",
                     "cuda_extension": "randomized_svd on CUDA" if backends.cuda_extension() is not None else "missing"},
        "ops": backends.registered(),
    }
