"""TailLoRLinear: a frozen nn.Linear plus a low-rank update learned in its spectral frame.

The module owns the parameters (A, B), the frame, the penalty's strength and the record of consolidated tasks,
and exports and loads that record (its part of a saved adapter: :meth:`TailLoRLinear.export_record` and
:meth:`TailLoRLinear.load_record`; :mod:`taillor.record` checks a record before it is loaded). The math lives in
:mod:`taillor.functional`; where A and B live (full or head frame) in :mod:`taillor.frame.modes`; access to the
wrapped weight in :mod:`taillor.base`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._sharded import full_tensor, gathered
from .base import base_for
from .config import TailLoRConfig
from .frame import FrameMode, SpectralFrame, compute_frame, frame_mode
from .protection import update_bases
from .record import base_sketch, check_merged_unchanged
from .strength import adapt_strength, head_share
from .task_state import read_task_state, task_state


def _whole(method):
    """A layer method that reads or changes whole parameters: on a model sharded by FSDP2 it runs on gathered
    copies, and each rank keeps its shard of the result (:func:`taillor._sharded.gathered`; a collective then, so
    every rank calls it). The no-grad factor cache is dropped: it may be keyed by the gathered copies."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with gathered(self):
            try:
                return method(self, *args, **kwargs)
            finally:
                self._factor_cache = None
    return run


def task_seed(seed: int, name: str, task: int) -> int:
    """A reproducible seed per (config seed, layer name, task index)."""
    return zlib.crc32(f"{seed}|{name}|{task}".encode()) & 0x7FFFFFFF


class TailLoRLinear(nn.Module):
    """y = x Wᵀ + b + s·x (U B A Vᵀ)ᵀ (full frame) or + s·x (B A)ᵀ (head frame), W and b frozen.

    Attributes: ``base_layer`` (the wrapped nn.Linear or bitsandbytes quantized linear), ``frame``
    (:class:`SpectralFrame`: U (d_out, k), S (k,), V (d_in, k)), ``lora_A`` (r, k) / (r, d_in) and ``lora_B``
    (k, r) / (d_out, r) — float32 parameters (float64 for a float64 base) — ``consolidated_up`` (d_out, R) and
    ``consolidated_down`` (R, d_in): the updates of finished tasks, folded into a float32/64 base weight (on a
    16-bit or quantized base: added by the forward as a frozen low-rank term, see :mod:`taillor.base`), kept so they
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
        weight = base.weight()  # dequantized once on a quantized base
        self.frame = frame if frame is not None else compute_frame(weight, config, where)
        self.base_sketch = base_sketch(full_tensor(weight))  # of the pre-trained weight, for a saved adapter
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        shape_A, shape_B = self.frame_mode.factor_shapes(config.rank, self.frame.rank, d_in, d_out)
        zeros = functools.partial(torch.zeros, dtype=dtype, device=base.device)
        self.lora_A, self.lora_B = nn.Parameter(zeros(shape_A)), nn.Parameter(zeros(shape_B))
        self.register_buffer("consolidated_up", zeros(d_out, 0), persistent=False)
        self.register_buffer("consolidated_down", zeros(0, d_in), persistent=False)
        # λ of this layer: config.penalty, or (head_share_target) adapted by a dual step per optimizer step.
        self.register_buffer("penalty_strength", torch.tensor(float(config.penalty), dtype=dtype,
                                                               device=base.device), persistent=False)
        # (energy, ‖ΔW‖²) at the last dual step: the next waits until A or B changed. Both come out of the penalty op
        # (opaque in eager and compiled code alike, so the same A, B give the same bits; a traced reduction may not).
        self.register_buffer("strength_seen", torch.full((2,) if self.adapts_strength else (0,), math.nan,
                                                         dtype=dtype, device=base.device), persistent=False)
        # protect_tasks: orthonormal bases of the finished tasks' left and right subspaces, in A's and B's
        # coordinates (see _refresh_protection); derived from consolidated_up/down, never saved.
        self.register_buffer("protect_U", zeros(shape_B[0], 0), persistent=False)
        self.register_buffer("protect_V", zeros(shape_A[1], 0), persistent=False)
        self.register_buffer("protect_omega2", zeros(0, dtype=self.frame.omega2.dtype), persistent=False)
        # What merge() added to the base weight, which unmerge() removes even if A, B changed since; empty if unmerged.
        self.register_buffer("merged_up", zeros(d_out, 0), persistent=False)
        self.register_buffer("merged_down", zeros(0, d_in), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
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
    def merged(self) -> bool:
        return self.merged_up.shape[1] > 0

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
    @_whole
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
            # Detached: in the head frame P is a view of A, and a view made under no_grad whose base the optimizer
            # then changes in place makes the module impossible to deepcopy.
            cached = self._factor_cache = (key, *(t.detach() for t in self.frame_mode.layer_factors(
                self.lora_A, self.lora_B, self.frame, dtype)))
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
            weight = self.base.weight().to(self.lora_A.dtype) - self.merged_up @ self.merged_down
            # On a quantized or 16-bit base the finished tasks are a frozen term beside the weight, not in it.
            return weight - self.consolidated_up @ self.consolidated_down if self.base.folds_tasks else weight

    def spectral_penalty(self, penalty: Optional[float] = None) -> Tensor:
        """λ·(‖Ω_Uᵀ ΔW‖²_F + ‖ΔW Ω_V‖²_F) in Gram form: a 0-dim tensor, differentiable in A and B; with
        ``config.protect_tasks`` plus λ·μ·(‖Q_Uᵀ ΔW‖²_F + ‖ΔW Q_V‖²_F) for the finished tasks' bases Q_U, Q_V.

        λ is ``penalty`` when given (e.g. ``config.penalty``, to read the reference value), else the layer's
        strength ``penalty_strength``: ``config.penalty``, or with ``config.head_share_target`` the adapted λ_l
        (:mod:`taillor.strength`). In that mode a call in training mode with gradients enabled first takes one
        dual step on λ_l if A or B changed since the last step: once per optimizer step, whatever the gradient
        accumulation.
        """
        # Under FSDP2 the parameters are sharded DTensors outside forward; A and B are small, so gather them
        # (differentiably: the backward reduce-scatters) rather than shard the r×r Gram computation.
        A, B = full_tensor(self.lora_A), full_tensor(self.lora_B)
        s2 = self.scaling ** 2
        if penalty is not None or not self.adapts_strength:
            strength = self.config.penalty if penalty is None else penalty
            return self._protected_energy(A, B, strength * s2)
        if not (self.training and torch.is_grad_enabled()):
            return self.penalty_strength.clone() * self._protected_energy(A, B, s2)
        energy, total = self._energies(A, B, s2)
        self._adapt_strength(energy.detach(), total)
        return self.penalty_strength.clone() * energy

    @property
    def adapts_strength(self) -> bool:
        """Whether λ is adapted to ``config.head_share_target`` (else it is ``config.penalty``; 0 = off)."""
        return self.config.adapts_strength

    @property
    def protects_tasks(self) -> bool:
        """Whether the penalty has a finished-task term now: ``config.protect_tasks`` with a weight > 0 and at
        least one consolidated task with a nonzero update (decided by shapes only, so compiled code can trace it)."""
        return self.config.protect_tasks and self.config.protect_tasks_weight > 0 and self.protect_U.shape[1] > 0

    def _task_energy(self, A: Tensor, B: Tensor, coeff: float) -> Tensor:
        """coeff·μ·(‖Q_Uᵀ ΔW‖² + ‖ΔW Q_V‖²)/s²: the head-frame Gram form with U_h := Q_U, V_h := Q_V, ω² = 1, exact in
        both frames because the frame's U and V have orthonormal columns (full frame: Q_U, Q_V in spectral
        coordinates)."""
        return F.spectral_penalty(A, B, self.protect_U, self.protect_V, self.protect_omega2,
                                  coeff * self.config.protect_tasks_weight)

    def _protected_energy(self, A: Tensor, B: Tensor, coeff: float) -> Tensor:
        """coeff·(head energy + μ·task energy), 0-dim, differentiable (the paper's penalty when nothing is
        protected beyond the head)."""
        U, V = self.frame_mode.penalty_frame(self.frame)
        energy = F.spectral_penalty(A, B, U, V, self.frame.omega2, coeff)
        if self.protects_tasks:
            energy = energy + self._task_energy(A, B, coeff)
        return energy

    def _energies(self, A: Tensor, B: Tensor, coeff: float) -> tuple[Tensor, Tensor]:
        """(coeff·protected energy (differentiable), coeff·‖B A‖² (detached)): one penalty call gives the head
        energy and the update's energy from the same Gram matrices."""
        U, V = self.frame_mode.penalty_frame(self.frame)
        energy, total = F.spectral_penalty_batched(A, B, U, V, self.frame.omega2, coeff)
        if self.protects_tasks:
            energy = energy + self._task_energy(A, B, coeff)
        return energy, total

    def head_share(self) -> Tensor:
        """The current update's ω²-weighted share of energy in the pre-trained head (:func:`strength.head_share`),
        a 0-dim tensor in [0, 1]; 0 while ΔW = 0. The finished tasks' term (``protect_tasks``) is not counted."""
        with torch.no_grad():
            A, B = full_tensor(self.lora_A), full_tensor(self.lora_B)
            U, V = self.frame_mode.penalty_frame(self.frame)
            return head_share(*F.spectral_penalty_batched(A, B, U, V, self.frame.omega2, 1.0))

    def _adapt_strength(self, energy: Tensor, total: Tensor) -> None:
        adapt_strength(self.penalty_strength, self.strength_seen, energy, total, self.config.head_share_target,
                       self.config.penalty)

    def _refresh_protection(self) -> None:
        """Recompute the finished tasks' bases from ``consolidated_up`` / ``consolidated_down`` (after a
        consolidation or a load): Q_U and Q_V span the column and row spaces of everything the finished tasks
        learned, up·down, expressed in B's and A's coordinates (:func:`update_bases`)."""
        if not self.config.protect_tasks:
            return
        with torch.no_grad():
            A_c, B_c = self.frame_mode.trainable_factors(self.consolidated_down.t(), self.consolidated_up, self.frame)
            self.protect_U, self.protect_V = update_bases(B_c, A_c)
            self.protect_omega2 = torch.ones(self.protect_U.shape[1], dtype=self.frame.omega2.dtype,
                                             device=self.frame.omega2.device)

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
        dtype = self.base.compute_dtype(x)
        x = x.to(dtype)
        if self.merged:  # the same input cast as unmerged, so merging never changes what an input gives
            return self.base_layer(x)
        P, Q = self.adapter_factors(dtype)
        x_adapter = self.dropout(x) if (self.training and self.config.dropout > 0) else None
        return self.base.adapted_forward(x, P, Q, self.scaling, x_adapter, self.consolidated_up,
                                         self.consolidated_down)

    # ------------------------------------------------------------------------------------------------------
    @_whole
    def current_factors(self) -> tuple[Tensor, Tensor]:
        """(up, down) = (s·Q, Pᵀ), (d_out, r) and (r, d_in), detached copies in the adapter's dtype: the current
        task's ΔW = up @ down. Gathered first when FSDP2 shards the parameters (a collective then)."""
        with torch.no_grad():
            P, Q = self.adapter_factors()
            return (self.scaling * Q).detach().clone(), P.t().detach().clone(memory_format=torch.contiguous_format)

    @_whole
    def merge(self) -> None:
        """Add ΔW to the base weight (in float32, cast back); the adapter stops contributing until unmerge()."""
        if not self.merged:
            up, down = self.base.with_unfolded_tasks(*self.current_factors(), self.consolidated_up,
                                                     self.consolidated_down)
            self.base.fold(up, down)  # first: a base that refuses (quantized) leaves the layer unmerged
            self.merged_up, self.merged_down = up, down

    @_whole
    def unmerge(self) -> None:
        """Remove what merge() added from the base weight (exact up to the base dtype's rounding)."""
        if self.merged:
            up, down = self.merged_up, self.merged_down
            self.base.fold(up, down, sign=-1.0)
            self.merged_up, self.merged_down = up.new_zeros(up.shape[0], 0), down.new_zeros(0, down.shape[1])

    @_whole
    def consolidate(self) -> None:
        """End a task: fold ΔW into the base weight, record it, and restart the adapter (new A, B = 0).

        The frame stays the pre-trained one, so the next task's penalty still protects the original head.
        Outputs are unchanged (within the base dtype's rounding).
        """
        self.unmerge()  # then fold the current ΔW (if it was merged, A and B may have changed since)
        up, down = self.current_factors()
        if self.base.folds_tasks:  # else (quantized, 16-bit) the forward adds the recorded factors, exactly
            self.base.fold(up, down)
        self.consolidated_up = torch.cat([self.consolidated_up, up], dim=1)
        self.consolidated_down = torch.cat([self.consolidated_down, down], dim=0)
        self.tasks_consolidated += 1
        self._refresh_protection()
        self.reset_adapter()

    # The finished tasks, λ and the merged factors travel in state_dict() too (:mod:`taillor.task_state`).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(task_state(self, prefix, keep_vars))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        state = read_task_state(state_dict, prefix, self, unexpected_keys, error_msgs)
        if state is None:
            return
        self.consolidated_up, self.consolidated_down = state["consolidated_up"], state["consolidated_down"]
        self.merged_up, self.merged_down = state["merged_up"], state["merged_down"]
        self.penalty_strength.fill_(state["penalty_strength"])
        self.strength_seen.fill_(math.nan)
        self.tasks_consolidated, self.base.folds_tasks = state["tasks_consolidated"], state["tasks_folded"]
        self._factor_cache = None
        self._refresh_protection()

    # ---------------------------------------------------------------------- the layer's record in a saved adapter
    @_whole
    def export_record(self) -> tuple[dict[str, Tensor], dict]:
        """This layer's part of a saved adapter: (tensors, meta), on the CPU.

        tensors: ``lora_P`` (d_in, r) and ``lora_Q`` (d_out, r) — the current adapter in layer coordinates,
        ΔW = s·Q Pᵀ — and ``consolidated_up`` (d_out, R), ``consolidated_down`` (R, d_in), the finished tasks.
        meta: d_in, d_out, rank, tasks_consolidated, merged, base_weight_norm and base_sketch (of the pre-trained
        weight, to recognise the base on load) and penalty_strength (λ of this layer, adapted with head_share_target).
        """
        check_merged_unchanged(self)
        with torch.no_grad():
            P, Q = self.adapter_factors()
        tensors = {"lora_P": P.detach().contiguous().cpu(), "lora_Q": Q.detach().contiguous().cpu(),
                   "consolidated_up": self.consolidated_up.contiguous().cpu(),
                   "consolidated_down": self.consolidated_down.contiguous().cpu()}
        meta = {"d_in": self.in_features, "d_out": self.out_features, "rank": self.config.rank,
                "tasks_consolidated": self.tasks_consolidated, "merged": self.merged,
                "base_weight_norm": float(self.pretrained_weight().double().norm()),
                "base_sketch": list(self.base_sketch), "penalty_strength": float(self.penalty_strength)}
        return tensors, meta

    @_whole
    def load_record(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a record of :meth:`export_record` (checked first with :func:`taillor.record.check_record`) onto this fresh
        layer: replay the consolidated tasks into the base weight (the same folds, so the same weight bit for bit
        on the same device), re-express the adapter in this machine's frame (A, B from P, Q), restore λ, merge if
        it was merged."""
        device, dtype = self.lora_A.device, self.lora_A.dtype
        up, down = (tensors[part].to(device=device, dtype=dtype) for part in ("consolidated_up", "consolidated_down"))
        r = meta["rank"]
        for task in range(meta["tasks_consolidated"] if self.base.folds_tasks else 0):
            self.base.fold(up[:, task * r:(task + 1) * r], down[task * r:(task + 1) * r])
        self.consolidated_up, self.consolidated_down = up.contiguous(), down.contiguous()
        self.tasks_consolidated = meta["tasks_consolidated"]
        self._refresh_protection()
        P, Q = (tensors[part].to(device=device, dtype=dtype) for part in ("lora_P", "lora_Q"))
        A, B = self.frame_mode.trainable_factors(P, Q, self.frame)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        if "penalty_strength" in meta:  # adapted λ (head_share_target); absent in adapters saved before it existed
            self.penalty_strength.fill_(float(meta["penalty_strength"]))
        if meta["merged"]:
            self.merge()

