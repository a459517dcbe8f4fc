"""A layer's record in a saved adapter: which tensors it holds, their shapes, and the check that a record fits the
model it is loaded onto (before anything changes). :meth:`taillor.layer.TailLoRLinear.export_record` writes a
record and :meth:`~taillor.layer.TailLoRLinear.load_record` restores it."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._sharded import full_tensor
from .base import base_for
from .config import TailLoRConfig

# The tensors of one layer in a saved adapter; ΔW = s·Q Pᵀ is stored in layer coordinates, which makes a saved
# adapter independent of the SVD routine's sign and basis choices.
RECORD_TENSORS = ("lora_P", "lora_Q", "consolidated_up", "consolidated_down")
# The base weight a record was trained on is recognised by its Frobenius norm, to this relative error.
BASE_NORM_RTOL = 1e-3


def record_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each record tensor, from the record's meta."""
    r, d_in, d_out = meta["rank"], meta["d_in"], meta["d_out"]
    R = r * meta["tasks_consolidated"]
    return {"lora_P": (d_in, r), "lora_Q": (d_out, r), "consolidated_up": (d_out, R), "consolidated_down": (R, d_in)}


def check_record(name: str, base_layer: nn.Module, tensors: dict[str, Tensor], meta: dict,
                 config: TailLoRConfig) -> None:
    """ValueError, naming the layer and the value, unless the record (tensors by part, meta) of layer ``name`` fits
    ``base_layer`` (the module it will wrap: sizes and pre-trained weight) and ``config`` (rank). Changes nothing."""
    base = base_for(base_layer, name)
    if (base.out_features, base.in_features) != (meta["d_out"], meta["d_in"]):
        raise ValueError(f"{name}: the adapter was saved for a {meta['d_in']}->{meta['d_out']} layer, the model "
                         f"has {base.in_features}->{base.out_features}")
    if meta["rank"] != config.rank:
        raise ValueError(f"{name}: saved rank {meta['rank']} differs from the config's rank {config.rank}")
    for part, shape in record_shapes(meta).items():
        tensor = tensors[part]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.{part}: saved shape {tuple(tensor.shape)}, expected {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}.{part}: saved tensor has non-finite entries")
    strength = meta.get("penalty_strength", 0.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"{name}: saved penalty_strength {strength!r} is not a finite number >= 0")
    norm = float(full_tensor(base.weight().detach()).double().norm())  # a collective on a sharded base
    if not math.isclose(norm, meta["base_weight_norm"], rel_tol=BASE_NORM_RTOL, abs_tol=1e-12):
        raise ValueError(f"{name}: this base weight (norm {norm:.6g}) is not the one the adapter was trained on "
                         f"(norm {meta['base_weight_norm']:.6g}); load adapters onto the original base model")
