"""The frozen base layer: the one place TailLoR reads or changes the weight it wraps.

TailLoR wraps nn.Linear. What the layer, the model API and the saved adapter need from a base goes through
:class:`LinearBase`: its sizes, its weight and bias for the adapter's fused forward, the dense weight that frames
and norms are computed from, and folding an update into the weight (merge, unmerge, consolidate, replaying a
saved adapter). Another kind of base (a quantized linear layer, say) is another class with the same methods,
listed in :data:`BASE_KINDS`; the layer, the model API and io do not change.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def fold_delta(weight: Tensor, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
    """weight += sign·(up @ down), computed in float32 (float64 for float64 weights) and cast back, in place.

    The one place where an update meets the base weight: merge, unmerge, consolidate and loading an adapter all go
    through it, so replaying a saved record reproduces the weight bit for bit on the same device.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        merged = weight.to(dtype).addmm_(up.to(dtype), down.to(dtype), alpha=sign)
        weight.copy_(merged)


class LinearBase:
    """Access to a frozen ``nn.Linear`` (y = x Wᵀ + b, W (d_out, d_in))."""

    def __init__(self, module: nn.Linear):
        self.module = module

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    def weight(self) -> Tensor:
        """The dense weight (d_out, d_in) as stored: frames, norms and the fused forward read it."""
        return self.module.weight

    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    def fold(self, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
        """W += sign·(up @ down) in place (see :func:`fold_delta`)."""
        fold_delta(self.module.weight, up, down, sign)


BASE_KINDS = (LinearBase,)


def is_supported_base(module: nn.Module) -> bool:
    """Whether TailLoR can wrap ``module``."""
    return any(kind.accepts(module) for kind in BASE_KINDS)


def base_for(module: nn.Module, where: str = "TailLoRLinear") -> LinearBase:
    """The access object of ``module``; TypeError naming ``where`` when TailLoR cannot wrap it."""
    for kind in BASE_KINDS:
        if kind.accepts(module):
            return kind(module)
    raise TypeError(f"{where}: TailLoR wraps nn.Linear layers, got {type(module).__name__}")
