"""Spectral frames: the fixed SVD basis (U, σ, V) of each frozen weight, and the two frame modes.

One job per module: :mod:`.spectral` (frame math — head sizes, penalty weights, randomized-SVD settings — and the
:class:`SpectralFrame` module), :mod:`.modes` (the full and head modes: where A and B live), :mod:`.build`
(computing the frames of many weights, batched and sharded) and :mod:`.cache` (the frame cache).
"""
from .build import build_frames, compute_frame
from .cache import clear_frame_cache, weight_digest
from .modes import FULL, HEAD, FrameMode, frame_mode
from .spectral import (EXACT_SVD_SHARE, HEAD_MIN_OVERSAMPLE, HEAD_NITER, SpectralFrame, frame_bytes,
                       frame_storage_dtype, head_from_count, head_from_energy, head_svd_settings, head_uses_exact_svd,
                       penalty_weights)

__all__ = [
    "EXACT_SVD_SHARE", "FULL", "FrameMode", "HEAD", "HEAD_MIN_OVERSAMPLE", "HEAD_NITER", "SpectralFrame",
    "build_frames", "clear_frame_cache", "compute_frame", "frame_bytes", "frame_mode", "frame_storage_dtype",
    "head_from_count", "head_from_energy", "head_svd_settings", "head_uses_exact_svd", "penalty_weights",
    "weight_digest",
]
