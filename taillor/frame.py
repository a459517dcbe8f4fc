"""Spectral frames: the fixed SVD basis (U, σ, V) of a frozen weight, the head size h and the penalty weights ω.

A full frame is the exact thin SVD (k = min(d_out, d_in) coordinates); a head frame holds the top-h triplets
only, from the randomized SVD (or the exact one when the sketch would cover half the matrix anyway).
Frames are derived data: they are recomputed from the pre-trained weight, never saved with an adapter, and
cached by a digest of the weight so a changed weight never reuses a stale frame.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .config import TailLoRConfig
from .functional import canonicalize_signs, randomized_svd

# Head frames: oversample p = max(HEAD_MIN_OVERSAMPLE, 2h) and HEAD_NITER power iterations. The error of the
# captured subspace falls like (σ_{h+p}/σ_h)^(2q+1); with p = 2h and q = 5 that is (σ_3h/σ_h)^11, which meets the
# frame accuracy contract (σ within 1e-3, principal angles < 1e-2) on the slowly decaying σ_i = 1/sqrt(i+1)
# (measured: p = h, q = 4 gave 2e-3 and 0.11 rad there; see tests/test_frame.py).
HEAD_MIN_OVERSAMPLE = 16
HEAD_NITER = 5
# Use the exact SVD when the randomized sketch would reach this share of min(d_out, d_in).
EXACT_SVD_SHARE = 0.5


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
    (float32, float64 for a float64 weight); ``head_size`` is h. k = min(d_out, d_in) (full) or h (head)."""

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


def compute_frame(weight: Tensor, config: TailLoRConfig, where: str = "layer") -> SpectralFrame:
    """The frame of one weight (d_out, d_in) under ``config``; see :func:`build_frames`."""
    return build_frames({where: weight}, config)[where]


def build_frames(weights: Mapping[str, Tensor], config: TailLoRConfig,
                 progress: bool = False) -> dict[str, SpectralFrame]:
    """Frames of many weights (name -> (d_out, d_in) tensor) under ``config``, computed in batches.

    Weights are checked first (2-D, finite; ValueError naming the layer), then h is resolved per layer, cached
    frames are reused, and the rest are grouped by (shape, dtype, device, h) and decomposed as one batched SVD
    per group. With torch.distributed initialized, each rank computes the groups of its share of the layers and
    broadcasts them, so every rank ends with every frame.
    """
    for where, weight in weights.items():
        if weight.dim() != 2:
            raise ValueError(f"{where}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{where}: the weight has non-finite entries (NaN or Inf); no frame can be built")
    # Full frame with head_energy: h only sets the penalty weights, so it comes from the frame's own singular
    # values (a cached frame or the one SVD below) instead of a separate svdvals of every weight.
    h_from_frame = config.frame == "full" and config.head_energy is not None
    heads = {where: None if h_from_frame else _head_size(w, config, where) for where, w in weights.items()}
    keys = {where: _cache_key(w, config) for where, w in weights.items()}
    entries = {where: _FRAME_CACHE.get(keys[where], config.frame_cache_dir) for where in weights}
    missing = sorted(where for where, entry in entries.items() if entry is None)
    rank, world = _distributed_rank_world()
    owners = {where: i % world for i, where in enumerate(missing)}
    groups: dict[tuple, list[str]] = {}
    for where in missing:
        if owners[where] == rank:
            w = weights[where]
            groups.setdefault((tuple(w.shape), w.dtype, str(w.device), heads[where]), []).append(where)
    bar = _progress(sum(len(g) for g in groups.values()), progress)
    for (_, _, _, h), names in groups.items():
        for chunk in _chunks(names, weights):
            stacked = torch.stack([weights[where].detach() for where in chunk])
            U, S, V = _decompose(stacked, h, config)
            for i, where in enumerate(chunk):
                entries[where] = (U[i].contiguous(), S[i].contiguous(), V[i].contiguous(), h)
            bar.update(len(chunk))
    bar.close()
    if world > 1:
        _broadcast_frames(missing, owners, entries, weights, heads, config)
    for where in missing:
        if h_from_frame:  # on every rank, so that a head_energy that leaves no tail raises on all of them
            entries[where] = (*entries[where][:3], _head_from_energy(entries[where][1], config, where))
        # The disk cache is written by the rank that computed the frame.
        _FRAME_CACHE.put(keys[where], entries[where], config.frame_cache_dir if owners[where] == rank else None)
    return {where: SpectralFrame(*(t.clone() for t in entries[where][:3]), entries[where][3],
                                 penalty_weights(entries[where][1], entries[where][3], config.penalty_weighting),
                                 config.frame)
            for where in weights}


def _frame_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _exact_svd(weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(weights.to(_frame_dtype(weights)), full_matrices=False)
    U, V = canonicalize_signs(U, Vh.mT)
    return U, S, V


def _decompose(weights: Tensor, h: int, config: TailLoRConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Frames of a batch (b, d_out, d_in) of same-shape weights sharing the head size h."""
    m = min(weights.shape[-2:])
    if config.frame == "full":
        return _exact_svd(weights)
    if head_uses_exact_svd(h, m, config):
        U, S, V = _exact_svd(weights)
        return U[..., :h], S[..., :h], V[..., :h]
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


_MAX_BATCH_BYTES = 1 << 30


def _chunks(names: list[str], weights: Mapping[str, Tensor]):
    """Split a same-shape group so that a stacked batch stays under 1 GiB."""
    per = max(1, _MAX_BATCH_BYTES // max(1, weights[names[0]].numel() * 4))
    for i in range(0, len(names), per):
        yield names[i:i + per]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    # disable=None: shown on a terminal only, so logs and CI stay clean.
    return tqdm(total=total, desc="taillor frames", unit="layer", disable=True if (not enabled or total == 0) else None)


def _distributed_rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_frames(missing, owners, entries, weights, heads, config) -> None:
    import torch.distributed as dist
    for where in missing:
        w = weights[where]
        d_out, d_in = w.shape
        k = min(d_out, d_in) if config.frame == "full" else heads[where]
        dtype = _frame_dtype(w)
        if entries[where] is None:
            entries[where] = (w.new_empty(d_out, k, dtype=dtype), w.new_empty(k, dtype=dtype),
                              w.new_empty(d_in, k, dtype=dtype), heads[where])
        for t in entries[where][:3]:
            dist.broadcast(t, src=owners[where])


# ---------------------------------------------------------------------------------------------------------------
# cache: in memory (bounded) and, with config.frame_cache_dir, on disk as safetensors
# ---------------------------------------------------------------------------------------------------------------
def weight_digest(weight: Tensor) -> str:
    """A content digest of a tensor (dtype, shape and bytes)."""
    data = weight.detach().contiguous().cpu()
    hasher = hashlib.blake2b(digest_size=20)
    hasher.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    hasher.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
    return hasher.hexdigest()


def _cache_key(weight: Tensor, config: TailLoRConfig) -> str:
    shaping = (config.frame, config.head, config.head_energy, config.svd_oversample, config.svd_niter,
               config.seed if config.frame == "head" else None, str(weight.device))
    return f"{weight_digest(weight)}-{hashlib.blake2b(repr(shaping).encode(), digest_size=8).hexdigest()}"


class _FrameCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _nbytes(entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry[:3])

    def get(self, key: str, cache_dir: Optional[str]):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        if cache_dir:
            path = os.path.join(cache_dir, f"frame-{key}.safetensors")
            if os.path.exists(path):
                from safetensors.torch import load_file
                data = load_file(path)
                entry = (data["U"], data["S"], data["V"], int(data["head_size"]))
                self._remember(key, entry)
                return entry
        return None

    def put(self, key: str, entry, cache_dir: Optional[str]) -> None:
        self._remember(key, entry)
        if cache_dir:
            from ._files import atomic_save_safetensors
            os.makedirs(cache_dir, exist_ok=True)
            U, S, V, h = entry
            atomic_save_safetensors({"U": U.cpu().contiguous(), "S": S.cpu().contiguous(),
                                     "V": V.cpu().contiguous(), "head_size": torch.tensor(h)},
                                    os.path.join(cache_dir, f"frame-{key}.safetensors"))

    def _remember(self, key: str, entry) -> None:
        size = self._nbytes(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_FRAME_CACHE = _FrameCache(max_bytes=int(os.environ.get("TAILLOR_FRAME_CACHE_MB", "1024")) * 2**20)


def clear_frame_cache() -> None:
    """Drop every in-memory cached frame (on-disk caches are left alone)."""
    _FRAME_CACHE.clear()
