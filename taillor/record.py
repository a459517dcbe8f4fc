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
# The base weight a record was trained on is recognised by its Frobenius norm, to this relative error, and by a
# sketch: Gᵀ W H with fixed Gaussian G (d_out, k), H (d_in, k), to BASE_SKETCH_RTOL of the sketch's norm. An update
# folded into W barely moves its norm (TailLoR keeps it nearly orthogonal to W: the norm moves by ~‖ΔW‖²/2‖W‖),
# while the sketch moves by about ‖ΔW‖/‖W‖: 5e-3 refuses a base holding a 1 % update and accepts a bfloat16 or
# float16 copy of the right one (rounding moves the sketch by 1.5e-3 / 2e-4).
BASE_NORM_RTOL = 1e-3
SKETCH_SIZE = 8
BASE_SKETCH_RTOL = 5e-3


def base_sketch(weight: Tensor) -> tuple[float, ...]:
    """The SKETCH_SIZE² numbers of Gᵀ W H for a (d_out, d_in) weight, G and H drawn in float64 on the CPU from a
    seed set by the shape (the same on every machine), W H in float32 on the weight's device, 1024 rows at a time
    (a 16-bit weight is never copied whole to float32)."""
    d_out, d_in = weight.shape
    gen = torch.Generator().manual_seed(d_out * 1_000_003 + d_in)
    G = torch.randn(d_out, SKETCH_SIZE, generator=gen, dtype=torch.float64) / math.sqrt(d_out)
    H = torch.randn(d_in, SKETCH_SIZE, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    H = H.to(device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        x = torch.cat([rows.to(torch.float32) @ H for rows in weight.detach().split(1024)])
        return tuple((G.t() @ x.double().cpu()).flatten().tolist())


def valid_strength(value) -> bool:
    """Whether a saved λ is a finite number >= 0 (a bool is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def record_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each record tensor, from the record's meta."""
    r, d_in, d_out = meta["rank"], meta["d_in"], meta["d_out"]
    R = r * meta["tasks_consolidated"]
    return {"lora_P": (d_in, r), "lora_Q": (d_out, r), "consolidated_up": (d_out, R), "consolidated_down": (R, d_in)}


def check_merged_unchanged(layer) -> None:
    """ValueError, naming the layer, if it is merged and A or B changed since merge(): a saved record holds the
    current adapter and replays merge() with it, which would not be what the base weight holds."""
    merged_now = layer.base.with_unfolded_tasks(*layer.current_factors(), layer.consolidated_up,
                                                layer.consolidated_down) if layer.merged else ()
    if not all(torch.equal(a, b) for a, b in zip(merged_now, (layer.merged_up, layer.merged_down))):
        raise ValueError(f"{layer.name or 'TailLoRLinear'}: A or B changed after merge(); unmerge() first (it removes "
                         "exactly what merge() added), then save")


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
    if not valid_strength(strength):
        raise ValueError(f"{name}: saved penalty_strength {strength!r} is not a finite number >= 0")
    weight = full_tensor(base.weight().detach())  # a collective on a sharded base
    norm = float(weight.double().norm())
    if not math.isclose(norm, meta["base_weight_norm"], rel_tol=BASE_NORM_RTOL, abs_tol=1e-12):
        raise ValueError(f"{name}: this base weight (norm {norm:.6g}) is not the one the adapter was trained on "
                         f"(norm {meta['base_weight_norm']:.6g}); load adapters onto the original base model")
    if "base_sketch" in meta:  # adapters saved before it existed are checked by the norm alone
        _check_sketch(name, base_sketch(weight), meta["base_sketch"])


def _check_sketch(name: str, sketch: tuple[float, ...], saved) -> None:
    if not isinstance(saved, (list, tuple)) or len(saved) != len(sketch) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in saved):
        raise ValueError(f"{name}: saved base_sketch is not {len(sketch)} finite numbers")
    scale = math.sqrt(sum(v * v for v in saved))
    off = math.sqrt(sum((a - b) ** 2 for a, b in zip(sketch, saved))) / max(scale, 1e-30)
    if off > BASE_SKETCH_RTOL:
        raise ValueError(f"{name}: this base weight is not the one the adapter was trained on (its sketch differs by "
                         f"{off:.2e} of its norm, more than {BASE_SKETCH_RTOL:g}: does it already hold an update, "
                         "merged or loaded before?); load adapters onto the original base model")
