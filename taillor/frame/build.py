"""Building frames: many weights at once — checked, head sizes resolved, cached frames reused, the rest grouped by
shape and decomposed in batched SVDs of at most 8 MiB each (:func:`build_plan`), and with torch.distributed
initialized sharded across ranks (each rank computes its share and broadcasts it).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .._host_memory import release_freed_host_memory
from ..config import TailLoRConfig
from ..functional import canonicalize_signs, randomized_svd
from .cache import FRAME_CACHE, cache_key
from .modes import frame_mode
from .spectral import (HEAD_MIN_OVERSAMPLE, HEAD_NITER, SpectralFrame, frame_storage_dtype, head_from_count,
                       head_from_energy, head_svd_settings, head_uses_exact_svd, penalty_weights)


def compute_frame(weight: Tensor, config: TailLoRConfig, where: str = "layer") -> SpectralFrame:
    """The frame of one weight (d_out, d_in) under ``config``; see :func:`build_frames`."""
    return build_frames({where: weight}, config)[where]


def build_frames(weights: Mapping[str, Tensor], config: TailLoRConfig,
                 progress: bool = False) -> dict[str, SpectralFrame]:
    """Frames of many weights (name -> (d_out, d_in) tensor) under ``config``, computed in batches.

    Weights are checked first (2-D, finite; ValueError naming the layer), then h is resolved per layer, cached
    frames are reused, and the rest are decomposed in the batches of :func:`build_plan`; a head frame is cut to its
    h triplets as soon as its batch is done, and freed host memory goes back to the system after each batch, so
    the peak stays near the frames kept (:func:`taillor.estimate_apply_memory` estimates it). With
    torch.distributed initialized, each rank computes its share of the layers and broadcasts it, so every rank ends
    with every frame.
    """
    for where, weight in weights.items():
        if weight.dim() != 2:
            raise ValueError(f"{where}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{where}: the weight has non-finite entries (NaN or Inf); no frame can be built")
    # Full frame with head_energy: h only sets the penalty weights, so it comes from the frame's own singular
    # values (a cached frame or the one SVD below) instead of a separate svdvals of every weight.
    mode = frame_mode(config.frame)
    h_from_frame = mode.full_spectrum and config.head_energy is not None
    heads = {where: None if h_from_frame else _head_size(w, config, where) for where, w in weights.items()}
    # One exact SVD per weight serves the full frame and every head frame cut from it.
    exact = {where: mode.full_spectrum or head_uses_exact_svd(heads[where], min(w.shape), config)
             for where, w in weights.items()}
    keys = {where: cache_key(w, config, exact[where], None if mode.full_spectrum else heads[where])
            for where, w in weights.items()}
    entries = {}
    for where, w in weights.items():
        entries[where] = FRAME_CACHE.get(keys[where], config.frame_cache_dir)
        if entries[where] is None and exact[where] and not mode.full_spectrum:  # a full frame's SVD, cut to h below
            entries[where] = FRAME_CACHE.get(cache_key(w, config, True), config.frame_cache_dir)
    missing = sorted(where for where, entry in entries.items() if entry is None)
    rank, world = _distributed_rank_world()
    owners = {where: i % world for i, where in enumerate(missing)}
    plan = build_plan({where: weights[where] for where in missing if owners[where] == rank},
                      {where: None if exact[where] else heads[where] for where in missing})
    bar = _progress(sum(len(chunk) for _, chunk in plan), progress)
    for h, chunk in plan:
        stacked = torch.stack([weights[where].detach() for where in chunk])
        U, S, V = _exact_svd(stacked) if h is None else _sketched_svd(stacked, h, config)
        del stacked
        storage = frame_storage_dtype(weights[chunk[0]].dtype, config)
        for i, where in enumerate(chunk):
            # A head frame cut from the exact SVD keeps (and caches) only its h triplets, cut here so that the
            # full decompositions of a whole model are never held at once. Always a copy: a view would keep the
            # whole batch alive.
            k = heads[where] if exact[where] and not mode.full_spectrum else S.shape[-1]
            entries[where] = (_own_copy(U[i, :, :k], storage), S[i, :k].clone(), _own_copy(V[i, :, :k], storage))
        del U, S, V
        if weights[chunk[0]].device.type == "cpu":
            release_freed_host_memory()
        bar.update(len(chunk))
    bar.close()
    if world > 1:
        _broadcast_frames(missing, owners, entries, weights, heads, exact, config)
    for where in missing:
        # The disk cache is written by the rank that computed the frame.
        FRAME_CACHE.put(keys[where], entries[where], config.frame_cache_dir if owners[where] == rank else None)
    computed_here = set(missing)  # the others came from the cache, memory or disk
    frames = {}
    for where in weights:
        entry = entries.pop(where)
        U, S, V = entry
        # from the frame's own spectrum on every rank, so that a head_energy leaving no tail raises on all of them
        h = _head_from_energy(S, config, where) if h_from_frame else heads[where]
        k = mode.frame_rank(min(weights[where].shape), h)
        U, S, V = U[:, :k], S[:k], V[:, :k]
        # A frame gets its own copy of what the memory cache keeps (so that changing one never changes the other);
        # a frame computed here that the cache did not keep is used as it is: cloning every frame made applying a
        # large model peak at twice its frames.
        if where not in computed_here or FRAME_CACHE.holds(keys[where], entry):
            U, S, V = U.clone(), S.clone(), V.clone()
        frames[where] = SpectralFrame(U, S, V, h, penalty_weights(S, h, config.penalty_weighting), config.frame)
    return frames


def _frame_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _exact_svd(weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    weights = weights.to(_frame_dtype(weights))
    if weights.shape[-2] < weights.shape[-1]:
        # LAPACK's CPU SVD of a wide matrix took 1.7x as long as of its transpose (576 x 1536, float32):
        # decompose Wᵀ = V S Uᵀ instead.
        V, S, Uh = torch.linalg.svd(weights.mT, full_matrices=False)
        U, V = canonicalize_signs(Uh.mT, V)
    else:
        U, S, Vh = torch.linalg.svd(weights, full_matrices=False)
        U, V = canonicalize_signs(U, Vh.mT)
    return U, S, V


def _sketched_svd(weights: Tensor, h: int, config: TailLoRConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Top-h triplets of a batch (b, d_out, d_in) of same-shape weights by the randomized SVD."""
    oversample, niter = head_svd_settings(h, config)
    U, S, V = randomized_svd(weights, h, niter=niter, oversample=oversample, seed=config.seed)
    dtype = _frame_dtype(weights)
    return U.to(dtype), S.to(dtype), V.to(dtype)


def _head_size(weight: Tensor, config: TailLoRConfig, where: str) -> int:
    m = min(weight.shape)
    if config.head_energy is None:
        return head_from_count(config, m, where)
    total = float(weight.double().pow(2).sum())
    k = min(m, 64)
    while True:
        if k == m:
            return _head_from_energy(torch.linalg.svdvals(weight.to(_frame_dtype(weight))), config, where)
        S = randomized_svd(weight, k, niter=HEAD_NITER, oversample=max(HEAD_MIN_OVERSAMPLE, 2 * k))[1]
        h = head_from_energy(S, total, config.head_energy) if total > 0 else 1
        if h <= len(S):
            return _checked_head(h, m, config, where)
        k = min(m, 2 * k)


def _head_from_energy(S: Tensor, config: TailLoRConfig, where: str) -> int:
    """h from every singular value of a weight (their squares sum to its energy)."""
    total = float(S.double().pow(2).sum())
    return _checked_head(head_from_energy(S, total, config.head_energy) if total > 0 else 1, len(S), config, where)


def _checked_head(h: int, m: int, config: TailLoRConfig, where: str) -> int:
    if not 1 <= h < m:
        raise ValueError(f"{where}: head_energy={config.head_energy!r} gives h={h}, but h must satisfy "
                         f"1 <= h < min(d_out, d_in)={m}")
    return h


# Stacking same-shape weights into one batched SVD saves little time on a CPU (LAPACK loops over the batch) but
# every byte of a batch is transient memory on top of the frames: 8 MiB bounds it (one weight when larger).
_MAX_BATCH_BYTES = 8 << 20


def build_plan(weights: Mapping[str, Tensor],
               heads: Mapping[str, Optional[int]]) -> list[tuple[Optional[int], list[str]]]:
    """The batched SVDs that build the frames of ``weights`` (name -> (d_out, d_in) tensor, meta tensors too), in
    the order they run: (h, names), h the sketch size or None for the exact SVD. Names are grouped by
    (shape, dtype, device, h) and each group is split so that a stacked batch (in float32) stays within
    _MAX_BATCH_BYTES."""
    groups: dict[tuple, list[str]] = {}
    for where in sorted(weights):
        w = weights[where]
        groups.setdefault((tuple(w.shape), w.dtype, str(w.device), heads[where]), []).append(where)
    plan = []
    for (shape, _, _, h), names in groups.items():
        per = max(1, _MAX_BATCH_BYTES // max(1, shape[0] * shape[1] * 4))
        plan.extend((h, names[i:i + per]) for i in range(0, len(names), per))
    return plan


def _own_copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    # disable=None: shown on a terminal only, so logs and CI stay clean.
    return tqdm(total=total, desc="taillor frames", unit="layer", disable=True if (not enabled or total == 0) else None)


def _distributed_rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_frames(missing, owners, entries, weights, heads, exact, config: TailLoRConfig) -> None:
    import torch.distributed as dist
    for where in missing:
        w = weights[where]
        d_out, d_in = w.shape
        k = min(d_out, d_in) if frame_mode(config.frame).full_spectrum else heads[where]
        dtype, storage = _frame_dtype(w), frame_storage_dtype(w.dtype, config)
        if entries[where] is None:
            entries[where] = (w.new_empty(d_out, k, dtype=storage), w.new_empty(k, dtype=dtype),
                              w.new_empty(d_in, k, dtype=storage))
        for t in entries[where]:
            dist.broadcast(t, src=owners[where])
