"""The model's penalty and dual step, one batched call per group of same-shaped TailLoR layers.

A model has many layers of few shapes (SmolLM2: 210 layers, 4 shapes). Called layer by layer, the penalty and the
adaptive strength's dual step are a handful of tiny ops each, which is latency-bound on a GPU and dominated by
per-op overhead on a CPU. Here the layers of one group (same config, frame mode, shapes, dtypes and device) run
:func:`taillor.functional.spectral_penalty_batched` once on A and B stacked (L, r, ·), and one dual step updates
the L strengths together.

The frame tensors (U_h, V_h, ω², the finished tasks' bases), the strengths λ_l and the last-step energies are
stacked once and each layer's buffer is re-pointed to its slice of the stack, so the stack is not a second copy
of the frames and every write (the dual step here, or a layer's own call) is seen by both. A layer whose buffer
was replaced since (``.to()``, a consolidation, a load) is noticed by identity and its group rebuilt. Layers
that cannot join a group run their own :meth:`TailLoRLinear.spectral_penalty`: sharded (DTensor) factors, a
group of one, mixed training modes, and everything while torch.compile traces (the per-layer path is the one it
compiles).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from .layer import TailLoRLinear
from .strength import dual_step

# Buffers a group stacks and re-points: (owner attribute path, buffer name).
_FRAME_BUFFERS = (("frame", "U"), ("frame", "V"), ("frame", "omega2"))
_TASK_BUFFERS = (("", "protect_U"), ("", "protect_V"), ("", "protect_omega2"))
_STRENGTH_BUFFERS = (("", "penalty_strength"), ("", "strength_seen"))

_GROUPS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _owner(layer: TailLoRLinear, path: str) -> nn.Module:
    return layer.frame if path == "frame" else layer


def _group_key(layer: TailLoRLinear) -> tuple:
    """Layers with equal keys can share one batched call: same options, shapes, dtypes and device."""
    frame = layer.frame
    tensors = (layer.lora_A, layer.lora_B, frame.omega2, layer.protect_U, layer.protect_V) + (
        (frame.U, frame.V) if layer.frame_mode.penalty_frame(frame)[0] is not None else ())
    return (layer.config, layer.frame_mode.name, layer.penalty_strength.dtype) + tuple(
        (tuple(t.shape), t.dtype, t.device) for t in tensors)


def _plain(layer: TailLoRLinear) -> bool:
    return all(type(t) in (Tensor, nn.Parameter) for t in (layer.lora_A, layer.lora_B))


class PenaltyGroup:
    """L same-shaped layers whose penalty runs as one batched call (see the module docstring)."""

    def __init__(self, layers: list[TailLoRLinear]):
        self.layers = layers
        first = layers[0]
        self.head = first.frame_mode.penalty_frame(first.frame)[0] is not None
        self.protects = first.protects_tasks
        names = list(_STRENGTH_BUFFERS) + (list(_FRAME_BUFFERS) if self.head else [_FRAME_BUFFERS[2]]) + (
            list(_TASK_BUFFERS) if self.protects else [])
        self.stacks: dict[str, Tensor] = {}
        self.views: list[tuple[nn.Module, str, Tensor]] = []
        # Made with grad mode as it is (buffers never require grad, so nothing is recorded): views made under
        # no_grad could not be written in place later with grad mode on.
        for path, name in names:
            stack = torch.stack([getattr(_owner(layer, path), name).detach() for layer in layers])
            self.stacks[name] = stack
            for i, layer in enumerate(layers):
                owner, view = _owner(layer, path), stack[i]
                setattr(owner, name, view)  # a registered buffer: the layer now holds its slice of the stack
                self.views.append((owner, name, view))

    def valid(self) -> bool:
        """True while every re-pointed buffer is still the slice this group made (nothing replaced it)."""
        return all(getattr(owner, name) is view for owner, name, view in self.views)

    def penalty(self, penalty: Optional[float]) -> Tensor:
        """Σ over the group of each layer's :meth:`TailLoRLinear.spectral_penalty`, as one batched call (a 0-dim
        tensor of the adapter's dtype), with the dual step of every layer when λ adapts (training mode,
        gradients enabled, all layers alike: the caller checks)."""
        first = self.layers[0]
        config = first.config
        A = torch.stack([layer.lora_A for layer in self.layers])
        B = torch.stack([layer.lora_B for layer in self.layers])
        s2 = first.scaling ** 2
        adapts = penalty is None and first.adapts_strength
        coeff = s2 if adapts else (config.penalty if penalty is None else penalty) * s2
        st = self.stacks
        value, total = F.spectral_penalty_batched(A, B, st.get("U"), st.get("V"), st["omega2"], coeff)
        if self.protects:
            value = value + F.spectral_penalty_batched(A, B, st["protect_U"], st["protect_V"], st["protect_omega2"],
                                                       coeff * config.protect_tasks_weight)[0]
        if not adapts:
            return value.sum()
        strength = st["penalty_strength"]
        if first.training and torch.is_grad_enabled():
            with torch.no_grad():
                energy = value.detach()
                pair = torch.stack((energy, total), dim=1)
                changed = (pair != st["strength_seen"]).any(dim=1)
                st["strength_seen"].copy_(pair)
                dual_step(strength, energy, total, changed, config.head_share_target, config.penalty)
        return (strength.clone() * value).sum()


def _build_groups(layers: list[TailLoRLinear]) -> list:
    """Groups of two or more same-keyed plain layers, and the layers left to run alone."""
    by_key: dict[tuple, list[TailLoRLinear]] = {}
    alone, frames = [], set()
    for layer in layers:
        # A frame shared by two layers cannot hold two slices: such layers run alone.
        if _plain(layer) and id(layer.frame) not in frames:
            by_key.setdefault(_group_key(layer), []).append(layer)
        else:
            alone.append(layer)
        frames.add(id(layer.frame))
    groups = []
    for members in by_key.values():
        if len(members) > 1:
            groups.append(PenaltyGroup(members))
        else:
            alone.extend(members)
    return groups + alone


def grouped_penalty(model: nn.Module, layers: list[TailLoRLinear], penalty: Optional[float],
                    device: torch.device) -> Tensor:
    """Σ over ``layers`` (every TailLoRLinear of ``model``) of λ_l·(penalty of layer l), one batched call per
    group of same-shaped layers (each layer alone while torch.compile traces). A 0-dim float32 tensor on
    ``device``."""
    total = torch.zeros((), device=device, dtype=torch.float32)
    if torch.compiler.is_compiling():
        for layer in layers:
            total = total + layer.spectral_penalty(penalty).to(device=device, dtype=torch.float32)
        return total
    units = _GROUPS.get(model)
    if units is None or not _current(units, layers):
        units = _GROUPS[model] = _build_groups(layers)
    for unit in units:
        if isinstance(unit, PenaltyGroup) and _uniform_mode(unit.layers):
            value = unit.penalty(penalty)
        elif isinstance(unit, PenaltyGroup):
            value = sum(layer.spectral_penalty(penalty) for layer in unit.layers)
        else:
            value = unit.spectral_penalty(penalty)
        total = total + value.to(device=device, dtype=torch.float32)
    return total


def _uniform_mode(layers: list[TailLoRLinear]) -> bool:
    training = layers[0].training
    return all(layer.training == training for layer in layers)


def _current(units: list, layers: list[TailLoRLinear]) -> bool:
    """True while ``units`` still cover exactly ``layers`` with the same keys and untouched buffers."""
    members = [layer for unit in units for layer in (unit.layers if isinstance(unit, PenaltyGroup) else [unit])]
    if len(members) != len(layers) or {id(m) for m in members} != {id(m) for m in layers}:
        return False
    return all(unit.valid() and unit.protects == unit.layers[0].protects_tasks for unit in units
               if isinstance(unit, PenaltyGroup))
