"""What applying TailLoR costs in memory, estimated from the layers' shapes before anything is allocated.

Applying keeps the frames (:func:`.spectral.frame_bytes` each), the frame cache's copy of those the in-memory cache
holds (least recently used first out, up to its limit), and A, B (with an adapting λ, also their copy as of λ's last
step). Its peak comes while the frames are built, so the estimate replays the build in the order it runs
(:func:`.build.build_plan` for stored weights, then quantized ones one at a time) and takes the largest of "frames
kept so far + the transient memory of the next SVD".

The transient of one batched exact SVD of b weights (d_out, d_in), X = b·d_out·d_in numbers, k = min(d_out, d_in),
weights of e bytes, frame math in f bytes (4; 8 for float64):

    X·e (the stacked batch) + X·f (its float32 copy, when e ≠ f) + X·f (LAPACK's working copy)
    + 2·b·k·(d_out + d_in)·f (U and V, and their sign-fixed copies)

plus, for a quantized weight, its dequantized copy (d_out·d_in·e). This form is fitted to peaks measured one batch
at a time on a CPU with torch's LAPACK (within 2 % on a single 8192×2048 weight, 6–20 % over on batches of small
ones; docs/quantized.md); LAPACK's own workspace is not counted. A randomized SVD's transient (head frames with a
small h) is counted like an exact one of the l = h + oversample sketched columns: an upper bound, not a fit.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, NamedTuple, Optional

import torch

from ..config import TailLoRConfig
from .build import build_plan
from .modes import frame_mode
from .spectral import frame_bytes, frame_size, head_from_count, head_svd_settings, head_uses_exact_svd


class LayerShape(NamedTuple):
    """A target layer as the estimate sees it: its weight's shape and dtype (the dequantized dtype of a quantized
    one) and whether it is quantized (its frame is then built one layer at a time from a dequantized copy)."""
    d_out: int
    d_in: int
    dtype: torch.dtype
    quantized: bool = False


def apply_footprint(layers: Mapping[str, LayerShape], config: TailLoRConfig, cache_limit: int) -> dict[str, int]:
    """Bytes of applying TailLoR to ``layers`` (name -> LayerShape) with an empty frame cache of ``cache_limit``
    bytes: ``frames``, ``frame_cache`` (the cache's copies left at the end), ``factors`` (A and B, and the two
    numbers an adapting λ keeps from its last step), ``kept`` (their sum: what applying
    leaves allocated) and ``peak`` (the most allocated at once while applying)."""
    sizes = {name: frame_bytes(s.d_out, s.d_in, s.dtype, config, name) for name, s in layers.items()}
    cache = _CacheReplay(cache_limit)
    held, peak = 0, 0  # bytes of the frames built so far; the most allocated at once

    def remember(name: str) -> None:
        s = layers[name]  # an entry is (U, S, V): the frame less its ω² (k numbers)
        omega2 = frame_size(s.d_out, s.d_in, config, name) * _math_bytes(s)
        cache.put(name, sizes[name] - omega2)

    stored = {n: torch.empty(s.d_out, s.d_in, dtype=s.dtype, device="meta") for n, s in layers.items()
              if not s.quantized}
    for h, chunk in build_plan(stored, {n: _sketched_head(layers[n], config, n) for n in stored}):
        peak = max(peak, held + _svd_transient_bytes(len(chunk), layers[chunk[0]], h, config))
        held += sum(sizes[n] for n in chunk)
    for name in sorted(stored):  # cached once the whole batch of stored weights is built
        remember(name)
    for name, s in layers.items():
        if s.quantized:  # built one at a time from a dequantized copy, cached at once
            dequantized = s.d_out * s.d_in * s.dtype.itemsize
            peak = max(peak, held + cache.bytes + dequantized
                       + _svd_transient_bytes(1, s, _sketched_head(s, config, name), config))
            held += sizes[name]
            remember(name)
    factors = sum(_factor_bytes(s, config, name) for name, s in layers.items())
    kept = held + cache.bytes + factors
    return {"frames": held, "frame_cache": cache.bytes, "factors": factors, "kept": kept, "peak": max(peak, kept)}


class _CacheReplay:
    """The in-memory frame cache's bookkeeping (FrameCache._remember): least recently used out first, an entry over
    the limit not kept."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0
        self._entries: OrderedDict[str, int] = OrderedDict()

    def put(self, name: str, size: int) -> None:
        if size > self.limit:
            return
        self._entries[name] = size
        self.bytes += size
        while self.bytes > self.limit:
            self.bytes -= self._entries.popitem(last=False)[1]


def _sketched_head(s: LayerShape, config: TailLoRConfig, name: str) -> Optional[int]:
    """h when build_frames sketches this layer's head frame with the randomized SVD (the h its plan is keyed by),
    None when the frame takes the exact SVD."""
    m = min(s.d_out, s.d_in)
    if frame_mode(config.frame).full_spectrum or config.head_energy is not None:
        return None  # head_energy: h is unknown before the SVD; counted at its largest, which is exact
    h = head_from_count(config, m, name)
    return None if head_uses_exact_svd(h, m, config) else h


def _svd_transient_bytes(batch: int, s: LayerShape, sketched_head: Optional[int], config: TailLoRConfig) -> int:
    math = _math_bytes(s)
    numbers = batch * s.d_out * s.d_in
    m = min(s.d_out, s.d_in)
    k = m if sketched_head is None else min(m, sketched_head + head_svd_settings(sketched_head, config)[0])
    copy = numbers * math if s.dtype.itemsize != math else 0
    return numbers * s.dtype.itemsize + copy + numbers * math + 2 * batch * k * (s.d_out + s.d_in) * math


def _factor_bytes(s: LayerShape, config: TailLoRConfig, name: str) -> int:
    k = frame_size(s.d_out, s.d_in, config, name)
    shape_A, shape_B = frame_mode(config.frame).factor_shapes(config.rank, k, s.d_in, s.d_out)
    seen = 2 if config.adapts_strength else 0  # an adapting λ keeps (energy, ‖ΔW‖²) of its last step
    return (shape_A[0] * shape_A[1] + shape_B[0] * shape_B[1] + seen) * _math_bytes(s)


def _math_bytes(s: LayerShape) -> int:
    """Bytes of a number in the frame math, S, ω², A and B: float32, float64 on a float64 weight."""
    return 8 if s.dtype == torch.float64 else 4
