"""TailLoRConfig: the one place where adapter options are named, defaulted and validated."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

FRAMES = ("full", "head")
PENALTY_WEIGHTINGS = ("head", "sigma", "sigma2")
INITS = ("kaiming", "tail")
FRAME_DTYPES = ("float32", "float64", "bfloat16", "float16")

TargetModules = Union[None, str, Sequence[str]]


@dataclass(frozen=True)
class TailLoRConfig:
    """Options of a TailLoR adapter. Frozen: build a new one with :func:`dataclasses.replace`.

    rank: adapter rank r (>= 1, <= min(d_out, d_in) of every target).
    alpha: scale numerator; the update is ``s·ΔW`` with ``s = alpha / rank`` (``alpha / sqrt(rank)`` with
        ``use_rslora``).
    target_modules: names matched exactly or as a dotted suffix (a list), a regex matched in full (a str), or
        ``"all-linear"`` (every nn.Linear except the output head, as PEFT does). Required by ``apply_taillor``.
    exclude_modules: same conventions; matched modules are never wrapped.
    frame: ``"head"`` (default: top-h triplets only; A, B in the layer's own coordinates, LoRA's learning rate,
        about a quarter of the full frame's memory) or ``"full"`` (the paper's form: complete thin SVD; A, B in
        spectral coordinates; about a third of LoRA's learning rate, see docs/decisions.md).
    head: h as an int count (1 <= h < m) or a float fraction of m in (0, 1).
    head_energy: if set, h is the smallest count whose squared singular values hold this share (0, 1) of the
        energy; overrides ``head``.
    penalty: λ, weight of the spectral penalty (>= 0); with ``head_share_target`` the starting λ of every layer.
        ``penalty=0`` turns the penalty off, whatever the target.
    head_share_target: if set (in (0, 1)), each layer adapts its own λ so that the pre-trained head holds this
        share of its update's energy, (‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) / (2‖ΔW‖²) (see :mod:`taillor.strength`). A
        scale-free strength: it means the same at any learning rate, alpha/rank, layer size and training length,
        where a fixed λ does not. An update blind to the spectrum puts about h/m there.
    protect_tasks: beyond the paper: also protect what earlier tasks learned. After each ``consolidate`` the
        finished tasks' updates span a left and a right subspace (at most r directions each per task); the penalty
        adds their energies, E_tasks = ‖Q_Uᵀ ΔW‖²_F + ‖ΔW Q_V‖²_F with Q_U, Q_V orthonormal bases of
        those subspaces, weighted by ``protect_tasks_weight``: P = λ·(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖² + μ·E_tasks), and the
        adapted λ's share counts both (see :mod:`taillor.strength`). True by default; False: the paper's penalty.
    protect_tasks_weight: μ >= 0, the weight of the earlier tasks' directions relative to the head's (ω = 1).
    penalty_weighting: ``"head"`` (ω = 1 on the head), ``"sigma"`` (σ_i/σ_0) or ``"sigma2"`` ((σ_i/σ_0)²).
    dropout: dropout probability on the adapter's input, in [0, 1).
    init: ``"kaiming"`` (A Kaiming-uniform, as PEFT) or ``"tail"`` (A zero on the head coordinates).
    seed: seeds A's initialisation (per layer and per task, reproducibly).
    svd_oversample / svd_niter: randomized-SVD settings for head frames; None picks accurate defaults
        (see :func:`taillor.frame.head_svd_settings`).
    frame_cache_dir: if set, frames are cached there as safetensors, keyed by a digest of the weight.
    frame_dtype: the dtype U and V are stored in, one of ``FRAME_DTYPES``; None (default) keeps a bf16 / fp16
        weight's dtype and uses float32 otherwise (float64 for float64 weights). S and ω² stay float32. The SVD
        itself always runs in float32 (float64); a 16-bit frame halves the frame's memory and puts the adapter's
        factors P, Q at that dtype's rounding (the bf16 / fp16 rows of the tolerance table).
    max_frame_bytes: if set, ``apply_taillor`` refuses (ValueError, before computing anything) a configuration
        whose frames would take more than this many bytes, and names the estimate and the alternative (a head
        frame). Runtime-only: not saved with the adapter.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: TargetModules = None
    exclude_modules: TargetModules = None
    frame: str = "head"
    head: Union[int, float] = 0.25
    head_energy: Optional[float] = None
    penalty: float = 1.0
    head_share_target: Optional[float] = 0.05
    protect_tasks: bool = True
    protect_tasks_weight: float = 1.0
    penalty_weighting: str = "head"
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "tail"
    seed: int = 0
    svd_oversample: Optional[int] = None
    svd_niter: Optional[int] = None
    frame_cache_dir: Optional[str] = field(default=None, compare=False)
    frame_dtype: Optional[str] = None
    max_frame_bytes: Optional[int] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple)):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        _check_int("rank", self.rank, minimum=1)
        _check_real("alpha", self.alpha)
        if self.alpha <= 0:
            raise ValueError(f"TailLoRConfig.alpha must be > 0, got {self.alpha!r}")
        _check_choice("frame", self.frame, FRAMES)
        _check_choice("penalty_weighting", self.penalty_weighting, PENALTY_WEIGHTINGS)
        _check_choice("init", self.init, INITS)
        _check_real("penalty", self.penalty)
        if self.penalty < 0:
            raise ValueError(f"TailLoRConfig.penalty must be >= 0, got {self.penalty!r}")
        if self.head_share_target is not None:
            _check_real("head_share_target", self.head_share_target)
            if not 0.0 < self.head_share_target < 1.0:
                raise ValueError(f"TailLoRConfig.head_share_target must be in (0, 1), got {self.head_share_target!r}")
        if not isinstance(self.protect_tasks, bool):
            raise TypeError(f"TailLoRConfig.protect_tasks must be a bool, got {self.protect_tasks!r}")
        _check_real("protect_tasks_weight", self.protect_tasks_weight)
        if self.protect_tasks_weight < 0:
            raise ValueError(f"TailLoRConfig.protect_tasks_weight must be >= 0, got {self.protect_tasks_weight!r}")
        _check_real("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TailLoRConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _check_head(self.head)
        if self.head_energy is not None:
            _check_real("head_energy", self.head_energy)
            if not 0.0 < self.head_energy < 1.0:
                raise ValueError(f"TailLoRConfig.head_energy must be in (0, 1), got {self.head_energy!r}")
        _check_int("seed", self.seed, minimum=0)
        if self.svd_oversample is not None:
            _check_int("svd_oversample", self.svd_oversample, minimum=0)
        if self.svd_niter is not None:
            _check_int("svd_niter", self.svd_niter, minimum=0)
        for name in ("target_modules", "exclude_modules"):
            _check_targets(name, getattr(self, name))
        if self.frame_dtype is not None:
            _check_choice("frame_dtype", self.frame_dtype, FRAME_DTYPES)
        if self.max_frame_bytes is not None:
            _check_int("max_frame_bytes", self.max_frame_bytes, minimum=1)

    @property
    def scaling(self) -> float:
        """s = alpha / rank, or alpha / sqrt(rank) with use_rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def adapts_strength(self) -> bool:
        """Whether each layer adapts its λ to ``head_share_target`` (else λ is ``penalty``; 0 = off)."""
        return self.head_share_target is not None and self.penalty > 0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        out.pop("frame_cache_dir")
        out.pop("max_frame_bytes")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TailLoRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TailLoRConfig fields {unknown}; known fields are {sorted(known)}")
        # A saved config names every field; one without these was written under the earlier defaults.
        return cls(**{"frame": "full", "protect_tasks": False, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"TailLoRConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"TailLoRConfig.{name} must be >= {minimum}, got {value!r}")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TailLoRConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"TailLoRConfig.{name} must be finite, got {value!r}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"TailLoRConfig.{name} must be one of {list(choices)}, got {value!r}")


def _check_head(head) -> None:
    if isinstance(head, bool) or not isinstance(head, (int, float)):
        raise TypeError(f"TailLoRConfig.head must be an int count or a float fraction, got {head!r}")
    if isinstance(head, int) and head < 1:
        raise ValueError(f"TailLoRConfig.head as a count must be >= 1, got {head!r}")
    if isinstance(head, float) and not 0.0 < head < 1.0:
        raise ValueError(f"TailLoRConfig.head as a fraction must be in (0, 1), got {head!r}")


def _check_targets(name: str, targets) -> None:
    if targets is None:
        return
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"TailLoRConfig.{name} is not a valid regex: {targets!r} ({err})") from None
        return
    if not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"TailLoRConfig.{name} must hold non-empty strings, got {list(targets)!r}")
    if not targets:
        raise ValueError(f"TailLoRConfig.{name} is an empty list; name at least one module")
