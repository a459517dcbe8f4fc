"""TailLoRLinear: a frozen nn.Linear plus a low-rank update learned in its spectral frame.

The module owns the parameters (A, B), the frame, the penalty's strength and the record of consolidated tasks,
and exports and loads that record (its part of a saved adapter: :meth:`TailLoRLinear.export_record`,
:func:`check_record`, :meth:`TailLoRLinear.load_record`). The math lives in :mod:`taillor.functional`; where A and
B live (full or head frame) in :mod:`taillor.frame.modes`; access to the wrapped weight in :mod:`taillor.base`.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from .base import base_for
from .config import TailLoRConfig
from .frame import FrameMode, SpectralFrame, compute_frame, frame_mode
from .strength import dual_step, head_share

# The tensors of one layer in a saved adapter; ΔW = s·Q Pᵀ is stored in layer coordinates, which makes a saved
# adapter independent of the SVD routine's sign and basis choices.
RECORD_TENSORS = ("lora_P", "lora_Q", "consolidated_up", "consolidated_down")
# The base weight a record was trained on is recognised by its Frobenius norm, to this relative error.
BASE_NORM_RTOL = 1e-3


def _full_tensor(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def task_seed(seed: int, name: str, task: int) -> int:
    """A reproducible seed per (config seed, layer name, task index)."""
    return zlib.crc32(f"{seed}|{name}|{task}".encode()) & 0x7FFFFFFF


class TailLoRLinear(nn.Module):
    """y = x Wᵀ + b + s·x (U B A Vᵀ)ᵀ (full frame) or + s·x (B A)ᵀ (head frame), W and b frozen.

    Attributes: ``base_layer`` (the wrapped nn.Linear or bitsandbytes quantized linear), ``frame``
    (:class:`SpectralFrame`: U (d_out, k), S (k,), V (d_in, k)), ``lora_A`` (r, k) / (r, d_in) and ``lora_B``
    (k, r) / (d_out, r) — float32 parameters (float64 for a float64 base) — ``consolidated_up`` (d_out, R) and
    ``consolidated_down`` (R, d_in): the updates of finished tasks, already folded into the base weight (on a
    quantized base: added by the forward as a frozen low-rank term, see :mod:`taillor.base`), kept so that they
    can be saved, exported and reported. Inputs may be any float dtype; the adapter runs in the base weight's
    dtype (or autocast's; on a quantized base, the input's).
    """

    def __init__(self, base_layer: nn.Linear, config: TailLoRConfig, name: str = "",
                 frame: Optional[SpectralFrame] = None):
        super().__init__()
        where = name or "TailLoRLinear"
        base = base_for(base_layer, where)
        d_out, d_in = base.out_features, base.in_features
        m = min(d_out, d_in)
        if config.rank > m:
            raise ValueError(f"{where}: rank={config.rank} exceeds min(d_out, d_in)={m} of a {d_in}->{d_out} layer")
        self.name = name
        self.config = config
        self.base_layer = base_layer
        self.base = base
        base_layer.requires_grad_(False)
        self.frame = frame if frame is not None else compute_frame(base.weight(), config, where)
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        shape_A, shape_B = self.frame_mode.factor_shapes(config.rank, self.frame.rank, d_in, d_out)
        self.lora_A = nn.Parameter(torch.zeros(shape_A, dtype=dtype, device=base.device))
        self.lora_B = nn.Parameter(torch.zeros(shape_B, dtype=dtype, device=base.device))
        self.register_buffer("consolidated_up", torch.zeros(d_out, 0, dtype=dtype, device=base.device),
                             persistent=False)
        self.register_buffer("consolidated_down", torch.zeros(0, d_in, dtype=dtype, device=base.device),
                             persistent=False)
        # λ of this layer: config.penalty, or (head_share_target) adapted by a dual step per optimizer step.
        self.register_buffer("penalty_strength", torch.tensor(float(config.penalty), dtype=dtype,
                                                               device=base.device), persistent=False)
        # A and B at the last dual step: the next step waits until the optimizer has changed them. Compared
        # elementwise, which is exact in eager and compiled code alike (a reduction's rounding is not).
        for name_, shape in (("strength_seen_A", shape_A), ("strength_seen_B", shape_B)):
            self.register_buffer(name_, torch.full(shape if self.adapts_strength else (0,), math.nan, dtype=dtype,
                                                   device=base.device), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.tasks_consolidated = 0
        self._factor_cache = None  # (key, P, Q) of adapter_factors without autograd
        self.reset_adapter()

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[TailLoRConfig] = None, name: str = "",
                    **options) -> "TailLoRLinear":
        """Wrap ``linear``; ``options`` are TailLoRConfig fields (e.g. rank=8, head=16, penalty=1e-3) that
        override ``config`` (default TailLoRConfig())."""
        config = dataclasses.replace(config or TailLoRConfig(), **options)
        return cls(linear, config, name=name)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def frame_mode(self) -> FrameMode:
        """Where A and B live (full: spectral coordinates; head: the layer's), :mod:`taillor.frame.modes`."""
        return frame_mode(self.config.frame)

    @property
    def head_size(self) -> int:
        return self.frame.head_size

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight()

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias()

    def extra_repr(self) -> str:
        return (f"rank={self.config.rank}, scaling={self.scaling:g}, frame={self.config.frame}, "
                f"head={self.head_size}, penalty={self.config.penalty:g}, tasks_consolidated="
                f"{self.tasks_consolidated}, merged={self.merged}")

    # ------------------------------------------------------------------------------------------------------
    def reset_adapter(self) -> None:
        """New A (Kaiming-uniform, or zero on the head with init="tail"), B = 0: the layer equals its base."""
        seed = task_seed(self.config.seed, self.name, self.tasks_consolidated)
        A = self.frame_mode.initial_A(tuple(self.lora_A.shape), self.lora_A.dtype, self.lora_A.device, seed,
                                      self.config.init, self.frame)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.zero_()

    def adapter_factors(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(P, Q) with ΔW = s·Q Pᵀ: P (d_in, r), Q (d_out, r) in ``dtype`` (default: the adapter's);
        differentiable. A 16-bit ``dtype`` makes the full-frame projection write its output in it directly.

        Without autograd (evaluation, generation under no_grad or inference_mode) they are computed once and
        reused until A, B or the frame change: a full-frame projection reads the whole frame (k·(d_in + d_out)
        numbers), which costs more than the layer's own product when one token is decoded at a time.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.frame_mode.layer_factors(self.lora_A, self.lora_B, self.frame, dtype)
        key = (dtype, torch.is_inference_mode_enabled()) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device) for t in (self.lora_A, self.lora_B, self.frame.U,
                                                                    self.frame.V) if t is not None)
        cached = self._factor_cache
        if cached is None or cached[0] != key:
            cached = self._factor_cache = (key, *self.frame_mode.layer_factors(self.lora_A, self.lora_B,
                                                                               self.frame, dtype))
        return cached[1], cached[2]

    def delta_weight(self) -> Tensor:
        """The current task's update ΔW = s·U B A Vᵀ (full) or s·B A (head), (d_out, d_in), adapter dtype."""
        P, Q = self.adapter_factors()
        return self.scaling * (Q @ P.t())

    def learned_delta(self) -> Tensor:
        """Everything learned so far: the consolidated tasks plus the current adapter, (d_out, d_in)."""
        return self.consolidated_up @ self.consolidated_down + self.delta_weight()

    def pretrained_weight(self) -> Tensor:
        """The base weight before any consolidation or merge, in the adapter's dtype."""
        with torch.no_grad():
            weight = self.base.weight().to(self.lora_A.dtype)
            if self.base.quantized:  # the finished tasks are a frozen term beside the weight, not folded into it
                return weight
            weight = weight - self.consolidated_up @ self.consolidated_down
            return weight - self.delta_weight() if self.merged else weight

    def spectral_penalty(self, penalty: Optional[float] = None) -> Tensor:
        """λ·(‖Ω_Uᵀ ΔW‖²_F + ‖ΔW Ω_V‖²_F) in Gram form: a 0-dim tensor, differentiable in A and B.

        λ is ``penalty`` when given (e.g. ``config.penalty``, to read the reference value), else the layer's
        strength ``penalty_strength``: ``config.penalty``, or with ``config.head_share_target`` the adapted λ_l
        (:mod:`taillor.strength`). In that mode a call in training mode with gradients enabled first takes one
        dual step on λ_l if A or B changed since the last step: once per optimizer step, whatever the gradient
        accumulation.
        """
        frame = self.frame
        # Under FSDP2 the parameters are sharded DTensors outside forward; A and B are small, so gather them
        # (differentiably: the backward reduce-scatters) rather than shard the r×r Gram computation.
        A, B = _full_tensor(self.lora_A), _full_tensor(self.lora_B)
        U, V = self.frame_mode.penalty_frame(frame)
        s2 = self.scaling ** 2
        if penalty is not None or not self.adapts_strength:
            strength = self.config.penalty if penalty is None else penalty
            return F.spectral_penalty(A, B, U, V, frame.omega2, strength * s2)
        energy = F.spectral_penalty(A, B, U, V, frame.omega2, s2)
        if self.training and torch.is_grad_enabled():
            self._adapt_strength(energy.detach(), A.detach(), B.detach())
        return self.penalty_strength.clone() * energy

    @property
    def adapts_strength(self) -> bool:
        """Whether λ is adapted to ``config.head_share_target`` (else it is ``config.penalty``; 0 = off)."""
        return self.config.adapts_strength

    def head_share(self) -> Tensor:
        """The current update's ω²-weighted share of energy in the pre-trained head (:func:`strength.head_share`),
        a 0-dim tensor in [0, 1]; 0 while ΔW = 0."""
        with torch.no_grad():
            A, B = _full_tensor(self.lora_A), _full_tensor(self.lora_B)
            U, V = self.frame_mode.penalty_frame(self.frame)
            energy = F.spectral_penalty(A, B, U, V, self.frame.omega2, self.scaling ** 2)
            return head_share(energy, self._update_energy(A, B))

    def _update_energy(self, A: Tensor, B: Tensor) -> Tensor:
        """‖ΔW‖²_F = s²·⟨A Aᵀ, Bᵀ B⟩ (U and V have orthonormal columns), without forming ΔW."""
        return self.scaling ** 2 * ((A @ A.t()) * (B.t() @ B)).sum()

    def _adapt_strength(self, energy: Tensor, A: Tensor, B: Tensor) -> None:
        with torch.no_grad():
            changed = (A != self.strength_seen_A).any() | (B != self.strength_seen_B).any()
            self.strength_seen_A.copy_(A)
            self.strength_seen_B.copy_(B)
            total = self._update_energy(A, B)
            dual_step(self.penalty_strength, head_share(energy, total), changed & (total > 0),
                      self.config.head_share_target, self.config.penalty)

    # ------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        # Cheap checks (a dtype flag, a shape compare; no host sync) so bad input fails as nn.Linear's does, but
        # named: an integer input would otherwise be cast silently, a wrong width fail inside a fused product.
        if not x.is_floating_point():
            raise TypeError(f"{self.name or 'TailLoRLinear'}: expected a floating-point input, got {x.dtype} "
                            "(nn.Linear does not cast integer or bool inputs either)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'TailLoRLinear'}: expected an input of width {self.in_features} (last "
                             f"dimension), got shape {tuple(x.shape)}")
        if self.merged:
            return self.base_layer(x)
        dtype = self.base.compute_dtype(x)
        P, Q = self.adapter_factors(dtype)
        x = x.to(dtype)
        x_adapter = self.dropout(x) if (self.training and self.config.dropout > 0) else None
        return self.base.adapted_forward(x, P, Q, self.scaling, x_adapter, self.consolidated_up,
                                         self.consolidated_down)

    # ------------------------------------------------------------------------------------------------------
    def _current_factors(self) -> tuple[Tensor, Tensor]:
        """(up, down) = (s·Q, Pᵀ), detached: ΔW = up @ down."""
        with torch.no_grad():
            P, Q = self.adapter_factors()
            return (self.scaling * Q).detach().clone(), P.t().detach().contiguous()

    def merge(self) -> None:
        """Add ΔW to the base weight (in float32, cast back); the adapter stops contributing until unmerge()."""
        if self.merged:
            return
        self.base.fold(*self._current_factors())
        self.merged = True

    def unmerge(self) -> None:
        """Remove the merged ΔW from the base weight (exact up to the base dtype's rounding)."""
        if not self.merged:
            return
        self.base.fold(*self._current_factors(), sign=-1.0)
        self.merged = False

    def consolidate(self) -> None:
        """End a task: fold ΔW into the base weight, record it, and restart the adapter (new A, B = 0).

        The frame stays the pre-trained one, so the next task's penalty still protects the original head.
        Outputs are unchanged (within the base dtype's rounding).
        """
        up, down = self._current_factors()
        if not self.merged and not self.base.quantized:  # a quantized base adds the recorded factors instead
            self.base.fold(up, down)
        self.consolidated_up = torch.cat([self.consolidated_up, up], dim=1)
        self.consolidated_down = torch.cat([self.consolidated_down, down], dim=0)
        self.merged = False
        self.tasks_consolidated += 1
        self.reset_adapter()

    # ------------------------------------------------------------------------------------------------------
    # the layer's record in a saved adapter
    # ------------------------------------------------------------------------------------------------------
    def export_record(self) -> tuple[dict[str, Tensor], dict]:
        """This layer's part of a saved adapter: (tensors, meta), on the CPU.

        tensors: ``lora_P`` (d_in, r) and ``lora_Q`` (d_out, r) — the current adapter in layer coordinates,
        ΔW = s·Q Pᵀ — and ``consolidated_up`` (d_out, R), ``consolidated_down`` (R, d_in), the finished tasks.
        meta: d_in, d_out, rank, tasks_consolidated, merged, base_weight_norm (of the pre-trained weight, to
        recognise the base on load) and penalty_strength (λ of this layer, adapted with head_share_target).
        """
        with torch.no_grad():
            P, Q = self.adapter_factors()
        tensors = {"lora_P": P.detach().contiguous().cpu(), "lora_Q": Q.detach().contiguous().cpu(),
                   "consolidated_up": self.consolidated_up.contiguous().cpu(),
                   "consolidated_down": self.consolidated_down.contiguous().cpu()}
        meta = {"d_in": self.in_features, "d_out": self.out_features, "rank": self.config.rank,
                "tasks_consolidated": self.tasks_consolidated, "merged": self.merged,
                "base_weight_norm": float(self.pretrained_weight().double().norm()),
                "penalty_strength": float(self.penalty_strength)}
        return tensors, meta

    def load_record(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a record of :meth:`export_record` (checked first with :func:`check_record`) onto this fresh
        layer: replay the consolidated tasks into the base weight (the same folds, so the same weight bit for bit
        on the same device), re-express the adapter in this machine's frame (A, B from P, Q), restore λ, merge if
        it was merged."""
        device, dtype = self.lora_A.device, self.lora_A.dtype
        up, down = (tensors[part].to(device=device, dtype=dtype) for part in ("consolidated_up", "consolidated_down"))
        r = meta["rank"]
        for task in range(0 if self.base.quantized else meta["tasks_consolidated"]):
            self.base.fold(up[:, task * r:(task + 1) * r], down[task * r:(task + 1) * r])
        self.consolidated_up, self.consolidated_down = up.contiguous(), down.contiguous()
        self.tasks_consolidated = meta["tasks_consolidated"]
        P, Q = (tensors[part].to(device=device, dtype=dtype) for part in ("lora_P", "lora_Q"))
        A, B = self.frame_mode.trainable_factors(P, Q, self.frame)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        if "penalty_strength" in meta:  # adapted λ (head_share_target); absent in adapters saved before it existed
            self.penalty_strength.fill_(float(meta["penalty_strength"]))
        if meta["merged"]:
            self.merge()


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
    norm = float(base.weight().detach().double().norm())
    if not math.isclose(norm, meta["base_weight_norm"], rel_tol=BASE_NORM_RTOL, abs_tol=1e-12):
        raise ValueError(f"{name}: this base weight (norm {norm:.6g}) is not the one the adapter was trained on "
                         f"(norm {meta['base_weight_norm']:.6g}); load adapters onto the original base model")
