"""The instruments of the benchmarks: a synchronized clock, the backend scope a method runs under, the memory an
autograd graph saves, the accuracy of singular values and subspaces, and the median that summarizes rounds.

Memory: on CUDA, ``peak MB`` is torch.cuda.max_memory_allocated during one forward+backward minus what was
allocated before it. On the CPU no allocator statistics exist (tracemalloc does not see torch), so it is the
bytes the autograd graph saves for backward (:func:`saved_bytes`: distinct storages, excluding the module's
parameters/buffers and the input) — the activation memory a method adds per layer.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..backends import use_backend


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend(name: Optional[str]):
    """The scope of one method's backend: ``taillor.use_backend`` ("eager", or "triton:split" / "triton:fused" for
    the two Triton routes of the adapter); None leaves the setting alone. Never touches ``os.environ``."""
    if name is None:
        return contextlib.nullcontext()
    setting, _, route = name.partition(":")
    return use_backend(setting, adapter=route or None)


def median(values: Iterable[float]) -> float:
    """The median of the finite values (NaN when there are none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def saved_bytes(fn: Callable[[], Tensor], exclude: Iterable[Tensor]) -> int:
    """Bytes of distinct storages the autograd graph of ``fn()`` saves for backward, minus those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def sigma_rel_error(S: Tensor, S_ref: Tensor) -> float:
    """max_i |σ̂_i − σ_i| / σ_i over the top-k."""
    k = S.shape[-1]
    ref = S_ref[..., :k].double()
    return float(((S.double().cpu() - ref.cpu()).abs() / ref.cpu().clamp_min(1e-30)).max())


def max_principal_angle(V: Tensor, V_ref: Tensor) -> float:
    """Largest principal angle (radians) between span(V) and span(V_ref), both n×k with orthonormal columns.

    Computed as arcsin of the spectral norm of (I − V_ref V_refᵀ) V, in float64: well conditioned for small
    angles (arccos of the cosines would floor at ~1e-3 for float32 bases)."""
    V, V_ref = V.double(), V_ref.double()
    residual = V - V_ref @ (V_ref.mT @ V)
    return float(torch.arcsin(torch.linalg.matrix_norm(residual, ord=2).clamp(0.0, 1.0)))


def time_call(fn: Callable, device: torch.device):
    """(seconds, fn()) with the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out

