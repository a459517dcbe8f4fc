"""Eager backend: the PyTorch implementation of every op, on every device (the default and the fallback)."""
from __future__ import annotations

from ..eager import randomized_svd, spectral_penalty, spectral_penalty_batched, spectral_projection, tail_adapter
from . import register_impl

_EVERY_DEVICE = ("cpu", "cuda", "meta", "mps", "xpu")

for _op, _fn in (("tail_adapter_fwd", tail_adapter.tail_adapter_forward),
                 ("tail_adapter_bwd", tail_adapter.tail_adapter_backward),
                 ("spectral_projection_fwd", spectral_projection.spectral_projection_forward),
                 ("spectral_projection_bwd", spectral_projection.spectral_projection_backward),
                 ("spectral_penalty_fwd", spectral_penalty.spectral_penalty_forward),
                 ("spectral_penalty_bwd", spectral_penalty.spectral_penalty_backward),
                 ("spectral_penalty_batched_fwd", spectral_penalty_batched.spectral_penalty_batched_forward),
                 ("spectral_penalty_batched_bwd", spectral_penalty_batched.spectral_penalty_batched_backward),
                 ("randomized_svd", randomized_svd.randomized_svd)):
    register_impl(_op, "eager", _EVERY_DEVICE, (lambda fn=_fn: fn))
