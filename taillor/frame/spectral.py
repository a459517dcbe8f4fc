"""Frame math and the frame module: the fixed SVD basis (U, σ, V) of a frozen weight, its head size h, the
penalty weights ω, and the randomized-SVD settings of head frames.

A full frame is the exact thin SVD (k = min(d_out, d_in) coordinates); a head frame holds the top-h triplets
only, from the randomized SVD (or the exact one when the sketch would cover half the matrix anyway).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TailLoRConfig

# Head frames: oversample p = max(HEAD_MIN_OVERSAMPLE, 2h) and HEAD_NITER power iterations. The error of the
# captured subspace falls like (σ_{h+p}/σ_h)^(2q+1); with p = 2h and q = 5 that is (σ_3h/σ_h)^11, which meets the
# frame accuracy contract (σ within 1e-3, principal angles < 1e-2) on the slowly decaying σ_i = 1/sqrt(i+1)
# (measured: p = h, q = 4 gave 2e-3 and 0.11 rad there; see tests/test_frame.py).
HEAD_MIN_OVERSAMPLE = 16
HEAD_NITER = 5
# Use the exact SVD when the randomized sketch would reach this share of min(d_out, d_in).
EXACT_SVD_SHARE = 0.5


def frame_storage_dtype(weight_dtype: torch.dtype, config: TailLoRConfig) -> torch.dtype:
    """The dtype a frame's U and V are stored in: ``config.frame_dtype``, else a 16-bit weight's own dtype, else
    float32 (float64 for a float64 weight)."""
    if config.frame_dtype is not None:
        return getattr(torch, config.frame_dtype)
    if weight_dtype in (torch.float16, torch.bfloat16, torch.float64):
        return weight_dtype
    return torch.float32


def frame_size(d_out: int, d_in: int, config: TailLoRConfig, where: str = "layer") -> int:
    """k, the number of triplets the frame of a (d_out, d_in) weight holds: min(d_out, d_in) for a full frame, h
    for a head frame; a head frame sized by ``head_energy`` (h unknown before its SVD) at its largest, m - 1."""
    m = min(d_out, d_in)
    if config.frame == "full":
        return m
    return m - 1 if config.head_energy is not None else head_from_count(config, m, where)


def frame_bytes(d_out: int, d_in: int, weight_dtype: torch.dtype, config: TailLoRConfig, where: str = "layer") -> int:
    """Bytes the frame of one (d_out, d_in) weight keeps: U (d_out, k) and V (d_in, k) in
    :func:`frame_storage_dtype`, S and ω² (k,) in float32 (float64 for a float64 weight); k from
    :func:`frame_size`."""
    k = frame_size(d_out, d_in, config, where)
    small = 8 if weight_dtype == torch.float64 else 4
    return k * (d_out + d_in) * frame_storage_dtype(weight_dtype, config).itemsize + 2 * k * small


def head_svd_settings(h: int, config: TailLoRConfig) -> tuple[int, int]:
    """(oversample, niter) for a head frame of size h: the config's values, else accurate defaults."""
    oversample = config.svd_oversample if config.svd_oversample is not None else max(HEAD_MIN_OVERSAMPLE, 2 * h)
    niter = config.svd_niter if config.svd_niter is not None else HEAD_NITER
    return oversample, niter


def head_uses_exact_svd(h: int, m: int, config: TailLoRConfig) -> bool:
    """Whether the head frame (size h) of a weight with m = min(d_out, d_in) comes from the exact SVD: when the
    randomized sketch (h + oversample columns) would reach EXACT_SVD_SHARE of m anyway."""
    oversample, _ = head_svd_settings(h, config)
    return h + oversample >= EXACT_SVD_SHARE * m


def head_from_count(config: TailLoRConfig, m: int, where: str) -> int:
    """h from ``config.head`` (an int count or a float fraction of m); ValueError unless 1 <= h < m."""
    head = config.head
    h = head if isinstance(head, int) else int(round(head * m))
    if not 1 <= h < m:
        raise ValueError(f"{where}: head={head!r} gives h={h}, but h must satisfy 1 <= h < min(d_out, d_in)={m}")
    return h


def head_from_energy(S: Tensor, total_energy: float, tau: float) -> int:
    """Smallest h with Σ_{i<h} σ_i² >= τ·total_energy (len(S) + 1 if the given σ do not reach it)."""
    cumulative = torch.cumsum(S.double() ** 2, 0)
    reached = torch.nonzero(cumulative >= tau * total_energy)
    return int(reached[0]) + 1 if len(reached) else len(S) + 1


def penalty_weights(S: Tensor, h: int, weighting: str) -> Tensor:
    """ω² over the frame's coordinates: ω = 1 on the head ("head"), σ_i/σ_0 ("sigma") or (σ_i/σ_0)² ("sigma2")."""
    if weighting == "head":
        omega = (torch.arange(len(S), device=S.device) < h).to(S.dtype)
    else:
        ratio = S / S[0] if float(S[0]) > 0 else torch.zeros_like(S)
        omega = ratio if weighting == "sigma" else ratio ** 2
    return omega ** 2


class SpectralFrame(nn.Module):
    """The fixed basis of one layer. U (d_out, k), S (k,), V (d_in, k) and omega2 (k,) are non-persistent buffers
    (U and V in :func:`frame_storage_dtype`, S and omega2 float32, float64 for a float64 weight); ``head_size``
    is h. k = min(d_out, d_in) (full) or h (head)."""

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, head_size: int, omega2: Tensor, mode: str):
        super().__init__()
        self.mode = mode
        self.head_size = head_size
        self.register_buffer("U", U.contiguous(), persistent=False)
        self.register_buffer("S", S.contiguous(), persistent=False)
        self.register_buffer("V", V.contiguous(), persistent=False)
        self.register_buffer("omega2", omega2.contiguous(), persistent=False)

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def extra_repr(self) -> str:
        return f"mode={self.mode}, k={self.rank}, head_size={self.head_size}"
