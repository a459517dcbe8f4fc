"""Split route of the adapter op: the base product y = x Wᵀ + b (and dx = dy W) through cuBLAS, the rank-r
products through small Triton kernels (``taillor._kernels.tail_adapter_split``). Same schema and autograd as the
fused route; forced with ``TAILLOR_ADAPTER_IMPL=split`` or ``use_backend(adapter="split")``, and the route of
``auto`` (the default) for layer steps below the onepass rule's size (backends/onepass.py): priority 10, no
predicate."""
from __future__ import annotations

from . import register_impl, triton_kernels, triton_unavailable
from .triton import FLOAT_DTYPES

for _op, _launcher in (("tail_adapter_fwd", "tail_adapter_split_forward"),
                       ("tail_adapter_bwd", "tail_adapter_split_backward")):
    register_impl(_op, "triton-split", ("cuda",), (lambda name=_launcher: getattr(triton_kernels(), name)),
                  family="triton", dtypes=FLOAT_DTYPES, route="split", available=triton_unavailable, priority=10)
