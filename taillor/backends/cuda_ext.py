"""CUDA extension backend: ``taillor._C.randomized_svd`` (cuBLAS/cuSOLVER) for float32/float16/bfloat16 CUDA
tensors, when the extension is built. ``TAILLOR_BACKEND=triton`` does not force it (it has no Triton kernel):
``auto`` and ``triton`` use it when built, ``eager`` never.

``TAILLOR_SVD_PRECISION`` (read at every call): ``fp32`` (default: every product with the weight in float32) or
``tf32`` (the range finder's products on TF32 tensor cores; the final projection that sets σ, U and V stays
float32). See docs/gpu.md for its measured error and modelled speed."""
from __future__ import annotations

import os

import torch

from .. import backends as registry
from ..eager.randomized_svd import sketch_error
from . import register_impl


def randomized_svd(A, k, niter, oversample, seed):
    """The extension on A (..., m, n): it takes one batch dimension, so leading dims are flattened and restored.

    Its only ValueError for arguments taillor.randomized_svd has validated is a NaN or Inf in the sketch A Ω:
    re-raised as :func:`sketch_error` says (NaN/Inf in A, or a finite A whose sketch overflowed)."""
    batch = A.shape[:-2]
    precision = svd_precision()
    try:
        U, S, V = registry.cuda_extension().randomized_svd(A.reshape(-1, *A.shape[-2:]).contiguous(), k, niter,
                                                           oversample, seed, precision)
    except ValueError as err:
        if "NaN or Inf" not in str(err):
            raise
        raise sketch_error(A) from err
    return U.reshape(*batch, *U.shape[-2:]), S.reshape(*batch, k), V.reshape(*batch, *V.shape[-2:])


def svd_precision() -> str:
    """``TAILLOR_SVD_PRECISION`` (read now): "fp32" (default) or "tf32"; anything else is a ValueError."""
    value = os.environ.get("TAILLOR_SVD_PRECISION", "").strip().lower() or "fp32"
    if value not in ("fp32", "tf32"):
        raise ValueError(f"TAILLOR_SVD_PRECISION must be fp32 or tf32, got {value!r}")
    return value


def _unavailable():
    return None if registry.cuda_extension() is not None else (
        "taillor._C is not built (reinstall with a CUDA build of torch and nvcc: "
        "pip install --no-build-isolation -e .)")


register_impl("randomized_svd", "cuda_ext", ("cuda",), lambda: randomized_svd,
              dtypes=(torch.float32, torch.float16, torch.bfloat16), available=_unavailable)
