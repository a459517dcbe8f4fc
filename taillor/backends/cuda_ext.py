"""CUDA extension backend: ``taillor._C.randomized_svd`` (cuBLAS/cuSOLVER) for float32/float16/bfloat16 CUDA
tensors, when the extension is built. ``TAILLOR_BACKEND=triton`` does not force it (it has no Triton kernel):
``auto`` and ``triton`` use it when built, ``eager`` never."""
from __future__ import annotations

import torch

from .. import backends as registry
from ..eager.randomized_svd import sketch_error
from . import register_impl


def randomized_svd(A, k, niter, oversample, seed):
    """The extension on A (..., m, n): it takes one batch dimension, so leading dims are flattened and restored.

    Its only ValueError for arguments taillor.randomized_svd has validated is a NaN or Inf in the sketch A Ω:
    re-raised as :func:`sketch_error` says (NaN/Inf in A, or a finite A whose sketch overflowed)."""
    batch = A.shape[:-2]
    try:
        U, S, V = registry.cuda_extension().randomized_svd(A.reshape(-1, *A.shape[-2:]).contiguous(), k, niter,
                                                           oversample, seed)
    except ValueError as err:
        if "NaN or Inf" not in str(err):
            raise
        raise sketch_error(A) from err
    return U.reshape(*batch, *U.shape[-2:]), S.reshape(*batch, k), V.reshape(*batch, *V.shape[-2:])


def _unavailable():
    return None if registry.cuda_extension() is not None else (
        "taillor._C is not built (reinstall with a CUDA build of torch and nvcc: "
        "pip install --no-build-isolation -e .)")


register_impl("randomized_svd", "cuda_ext", ("cuda",), lambda: randomized_svd,
              dtypes=(torch.float32, torch.float16, torch.bfloat16), available=_unavailable)
