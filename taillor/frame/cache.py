"""The frame cache: frames are derived data, recomputed from the pre-trained weight and never saved with an
adapter, so they are cached by a digest of the weight (a changed weight never reuses a stale frame) — in memory,
bounded by ``TAILLOR_FRAME_CACHE_MB`` (default 1024, read whenever the cache grows), and on disk as
safetensors under ``config.frame_cache_dir`` when it is set.

An entry is the decomposition (U, S, V) of one weight. The exact SVD is keyed by the weight and the number of
triplets kept, so a head frame cut from it keeps only its h triplets in memory, and reuses a cached full frame's
SVD when there is one (whatever its seed or weighting); randomized head frames are keyed by the weight and every
setting that shapes the sketch.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from .._files import atomic_save_safetensors
from ..config import TailLoRConfig

DEFAULT_CACHE_MB = 1024


def weight_digest(weight: Tensor) -> str:
    """A content digest of a tensor (dtype, shape and bytes)."""
    data = weight.detach().contiguous().cpu()
    hasher = hashlib.blake2b(digest_size=20)
    hasher.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    hasher.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
    return hasher.hexdigest()


def cache_key(weight: Tensor, config: TailLoRConfig, exact: bool, head: Optional[int] = None) -> str:
    """The key of ``weight``'s decomposition: its digest (dtype included) and device, the frame dtype when set,
    and for the ``exact`` SVD how many triplets are kept (``head``; None: all), else every setting of ``config``
    that shapes the randomized sketch."""
    shaping = (str(weight.device), config.frame_dtype)
    if exact:
        shaping += (head,)
    else:
        shaping += (config.head, config.head_energy, config.svd_oversample, config.svd_niter, config.seed)
    kind = "exact" if exact else "sketch"
    return f"{weight_digest(weight)}-{kind}-{hashlib.blake2b(repr(shaping).encode(), digest_size=8).hexdigest()}"


def cache_limit_bytes() -> int:
    """The in-memory cache's size limit: ``TAILLOR_FRAME_CACHE_MB`` (read now), default 1024 MB."""
    value = os.environ.get("TAILLOR_FRAME_CACHE_MB", "").strip() or str(DEFAULT_CACHE_MB)
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"TAILLOR_FRAME_CACHE_MB must be a number of megabytes, got {value!r}") from None
    if megabytes < 0:
        raise ValueError(f"TAILLOR_FRAME_CACHE_MB must be >= 0, got {value!r}")
    return int(megabytes * 2**20)


class FrameCache:
    """Least-recently-used frames in memory (thread-safe), backed by an optional folder of safetensors files."""

    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = max_bytes  # None: cache_limit_bytes(), read whenever the cache grows
        self._entries: OrderedDict[str, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _nbytes(entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry)

    def get(self, key: str, cache_dir: Optional[str]):
        """The entry of ``key`` from memory, else from ``cache_dir``, else None."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        if cache_dir:
            path = os.path.join(cache_dir, f"frame-{key}.safetensors")
            if os.path.exists(path):
                from safetensors.torch import load_file
                data = load_file(path)
                entry = (data["U"], data["S"], data["V"])
                self._remember(key, entry)
                return entry
        return None

    def put(self, key: str, entry, cache_dir: Optional[str]) -> None:
        """Keep ``entry`` in memory and, with ``cache_dir``, write it there (atomically)."""
        self._remember(key, entry)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_save_safetensors({name: t.cpu().contiguous() for name, t in zip("USV", entry)},
                                    os.path.join(cache_dir, f"frame-{key}.safetensors"))

    def _remember(self, key: str, entry) -> None:
        limit = cache_limit_bytes() if self.max_bytes is None else self.max_bytes
        size = self._nbytes(entry)
        if size > limit:
            return
        with self._lock:
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > limit:
                _, old = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(old)

    def holds(self, key: str, entry) -> bool:
        """Whether the memory cache keeps this very ``entry`` under ``key`` (not a copy, not an evicted one)."""
        with self._lock:
            return self._entries.get(key) is entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


FRAME_CACHE = FrameCache()


def clear_frame_cache() -> None:
    """Drop every in-memory cached frame (on-disk caches are left alone)."""
    FRAME_CACHE.clear()
