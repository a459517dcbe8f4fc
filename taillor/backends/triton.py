"""Triton backend: the kernels of ``kernels/`` (installed as ``taillor._kernels``) for CUDA tensors, and for CPU
tensors under ``TRITON_INTERPRET=1``. The adapter op's fused route lives here (priority 0: it runs when forced, ``TAILLOR_ADAPTER_IMPL=fused``); its
split and onepass routes in split.py and onepass.py."""
from __future__ import annotations

import torch

from . import register_impl, triton_kernels, triton_unavailable

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

for _op, _launcher, _route in (("tail_adapter_fwd", "tail_adapter_forward", "fused"),
                               ("tail_adapter_bwd", "tail_adapter_backward", "fused"),
                               ("spectral_projection_fwd", "spectral_projection_forward", None),
                               ("spectral_projection_bwd", "spectral_projection_backward", None),
                               ("spectral_penalty_fwd", "spectral_penalty_forward", None),
                               ("spectral_penalty_bwd", "spectral_penalty_backward", None),
                               ("spectral_penalty_batched_fwd", "spectral_penalty_batched_forward", None),
                               ("spectral_penalty_batched_bwd", "spectral_penalty_batched_backward", None)):
    register_impl(_op, "triton" if _route is None else f"triton-{_route}", ("cuda",),
                  (lambda name=_launcher: getattr(triton_kernels(), name)), family="triton", dtypes=FLOAT_DTYPES,
                  route=_route, available=triton_unavailable)
