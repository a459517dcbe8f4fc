"""The frame cache: frames are derived data, recomputed from the pre-trained weight and never saved with an
adapter, so they are cached by a digest of the weight (a changed weight never reuses a stale frame; the digest is
computed on the weight's device, see :func:`weight_digest`) — in memory,
bounded by ``TAILLOR_FRAME_CACHE_MB`` (default 1024, read whenever the cache grows), and on disk as
safetensors under ``config.frame_cache_dir`` when it is set.

An entry is the decomposition (U, S, V) of one weight. The exact SVD is keyed by the weight and the number of
triplets kept, so a head frame cut from it keeps only its h triplets in memory, and reuses a cached full frame's
SVD when there is one (whatever its seed or weighting); randomized head frames are keyed by the weight and every
setting that shapes the sketch.
"""
from __future__ import annotations

import functools
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
    """A content digest of a tensor (dtype, shape and bytes). A CPU tensor is hashed with BLAKE2b; a tensor on
    another device is hashed there (:func:`device_checksum`), so only 16 bytes ever reach the host: applying
    TailLoR to a model on a GPU never copies its weights to the CPU to key their frames."""
    if weight.device.type == "cpu":
        data = weight.detach().contiguous()
        hasher = hashlib.blake2b(digest_size=20)
        hasher.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
        hasher.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        return hasher.hexdigest()
    lanes = device_checksum(weight)
    tag = f"{weight.dtype}|{tuple(weight.shape)}|device-v1|{lanes[0]}|{lanes[1]}"
    return hashlib.blake2b(tag.encode(), digest_size=20).hexdigest()


# device_checksum's multipliers: an odd pseudo-random 64-bit number per word position, from a SplitMix64-style mix
# of the position done with int64 tensor ops (wrapping arithmetic; arithmetic right shifts keep each step a
# bijection). Two lanes with different seeds. A table of one chunk's multipliers is made once per device and lane;
# chunk c's sum is weighted by a multiplier of c, so moving data between chunks changes the checksum too.
_CHUNK_WORDS = 1 << 22
_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_TABLES: dict[tuple[str, int, int], Tensor] = {}


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _multipliers(positions: Tensor, seed: int) -> Tensor:
    """Odd pseudo-random int64 multipliers of ``positions`` (int64), one per position."""
    z = positions * _signed64(_MIX[0]) + _signed64(seed)
    z = (z ^ (z >> 30)) * _signed64(_MIX[1])
    z = (z ^ (z >> 27)) * _signed64(_MIX[2])
    return (z ^ (z >> 31)) | 1


def _table(device: torch.device, seed: int, length: int) -> Tensor:
    """The first ``length`` multipliers of ``seed`` on ``device`` (cached per device, seed and chunk length)."""
    key = (str(device), seed, length)
    table = _TABLES.get(key)
    if table is None:
        table = _multipliers(torch.arange(length, dtype=torch.int64, device=device), seed)
        _TABLES[key] = table
    return table


@functools.lru_cache(maxsize=4096)
def _chunk_multiplier(chunk: int, seed: int) -> int:
    """The odd multiplier M_c of chunk ``chunk`` in the lane of ``seed`` (a host-side int64)."""
    return int(_multipliers(torch.tensor([chunk], dtype=torch.int64), seed ^ 0x5A5A5A5A)[0])


def device_checksum(tensor: Tensor, chunk_words: int = _CHUNK_WORDS) -> tuple[int, int]:
    """Two 64-bit lanes h = Σ_c M_c · Σ_j word_(c,j) · m_j (mod 2^64) over the bytes of ``tensor``, on its device.

    The bytes are read as 32-bit words (16- or 8-bit when the byte count is not a multiple of 4), in chunks of
    ``chunk_words``; m_j is an odd pseudo-random multiplier of a word's position in its chunk and M_c one of the
    chunk's index, one sequence per lane. Position-dependent, so a moved or swapped value changes the sum; a
    collision needs the change of the data to be orthogonal to both lanes' multipliers mod 2^64. Not
    cryptographic: it keys a cache of derived data. Works on every device (tested on the CPU); 16 bytes reach the
    host. Cost: about 76 bytes of memory traffic per 4-byte word (conversion, two products, two sums)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    nbytes = data.numel()
    word = next(w for w in (4, 2, 1) if nbytes % w == 0)
    words = data.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[word])
    length = min(chunk_words, max(words.numel(), 1))
    tables = [_table(data.device, seed, length) for seed in _SEEDS]
    total = torch.zeros(2, dtype=torch.int64, device=data.device)
    for c, start in enumerate(range(0, words.numel(), chunk_words)):
        chunk = words[start:start + chunk_words].to(torch.int64)
        for lane, seed in enumerate(_SEEDS):
            total[lane] += (chunk * tables[lane][:chunk.numel()]).sum() * _chunk_multiplier(c, seed)
    lanes = total.tolist()
    return lanes[0] & ((1 << 64) - 1), lanes[1] & ((1 << 64) - 1)


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
