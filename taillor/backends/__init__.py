"""The backend registry: which implementation runs each taillor op, for a device type, a dtype and a setting.

Every op of :mod:`taillor.ops` has an eager implementation (PyTorch, every device, the default and the oracle's
closest neighbour) and may have native ones. Each backend registers its implementations in its own file with
:func:`register_impl`:

    ===========================  ==================  =======================  ======================
    op                           eager (every dev.)  triton family (CUDA)     cuda_ext (CUDA)
    ===========================  ==================  =======================  ======================
    tail_adapter_fwd / _bwd      eager.py            triton.py (route fused)
                                                     split.py (route split)
    spectral_projection_fwd/_bwd eager.py            triton.py
    spectral_penalty_fwd / _bwd  eager.py            triton.py
    spectral_penalty_batched_*   eager.py            triton.py
    randomized_svd               eager.py                                     cuda_ext.py
    ===========================  ==================  =======================  ======================

The setting comes from :func:`use_backend` (a context manager, per thread and task) or else from the environment:

* ``TAILLOR_BACKEND=auto`` (default): per op, its native implementation for the tensors' device and dtype when it
  is available (Triton for CUDA tensors when Triton imports; the CUDA extension for ``randomized_svd`` when it is
  built), the eager one otherwise.
* ``TAILLOR_BACKEND=eager``: every op eager.
* ``TAILLOR_BACKEND=triton``: ops with a Triton implementation must use it (a RuntimeError says why when they
  cannot: no Triton, a CPU tensor without ``TRITON_INTERPRET=1``, an unsupported dtype). Ops without one
  (``randomized_svd``) keep their ``auto`` choice: this setting never forces the CUDA extension.
* ``TAILLOR_ADAPTER_IMPL=split|fused`` picks the Triton route of the adapter op: ``split`` (default on CUDA:
  cuBLAS for the base product, Triton for the rank-r products) or ``fused`` (one Triton GEMM for both). No GPU
  measurement of the two exists yet; the default follows the first one that does.

The choice is resolved once per (op, device type, dtype, setting, route, interpreter) and cached. The Triton
interpreter (``TRITON_INTERPRET=1``) is read at every call, never frozen at import: with it, the Triton
implementations also accept CPU tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

SETTINGS = ("eager", "triton", "auto")
ADAPTER_ROUTES = ("split", "fused")
DEFAULT_ADAPTER_ROUTE = "split"  # no GPU measurement yet (benchmarks/RESULTS.md): split until one says otherwise

_OVERRIDE: contextvars.ContextVar[tuple[Optional[str], Optional[str]]] = contextvars.ContextVar(
    "taillor_backend", default=(None, None))


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. ``load()`` returns the callable (imports lazily); ``family`` is what the
    setting selects ("eager", "triton", "cuda_ext"); ``route`` tells the adapter routes apart."""
    op: str
    backend: str
    family: str
    devices: tuple[str, ...]
    load: Callable[[], Callable]
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    route: Optional[str] = None
    available: Callable[[], Optional[str]] = field(default=lambda: None)  # None, or why it cannot run


_REGISTRY: dict[str, list[Impl]] = {}


def register_impl(op: str, backend: str, devices: tuple[str, ...], load: Callable[[], Callable], *,
                  family: Optional[str] = None, dtypes: Optional[tuple[torch.dtype, ...]] = None,
                  route: Optional[str] = None, available: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Register implementation ``backend`` of ``op`` for ``devices`` (device types, e.g. ("cuda",))."""
    impls = _REGISTRY.setdefault(op, [])
    if any(i.backend == backend for i in impls):
        raise ValueError(f"op {op!r} already has a {backend!r} implementation")
    impls.append(Impl(op, backend, family or backend, tuple(devices), load, dtypes, route,
                      available or (lambda: None)))
    _resolve.cache_clear()


def implementations(op: str) -> tuple[Impl, ...]:
    """Every registered implementation of ``op``, in registration order (the order ``auto`` tries them)."""
    return tuple(_REGISTRY.get(op, ()))


def registered(op: Optional[str] = None) -> dict[str, list[str]]:
    """{op: [backend names]} of every registered op (or of ``op`` only)."""
    ops = [op] if op is not None else sorted(_REGISTRY)
    return {name: [i.backend for i in _REGISTRY.get(name, [])] for name in ops}


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
def _checked(value: str, allowed: tuple[str, ...], what: str) -> str:
    value = value.strip().lower()
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def requested_backend() -> str:
    """The backend setting in force: :func:`use_backend`'s, else ``TAILLOR_BACKEND`` (default "auto")."""
    backend = _OVERRIDE.get()[0]
    if backend is not None:
        return backend
    return _checked(os.environ.get("TAILLOR_BACKEND", "auto") or "auto", SETTINGS, "TAILLOR_BACKEND")


def adapter_route() -> str:
    """The adapter's Triton route: :func:`use_backend`'s, else ``TAILLOR_ADAPTER_IMPL`` (default "split")."""
    route = _OVERRIDE.get()[1]
    if route is not None:
        return route
    return _checked(os.environ.get("TAILLOR_ADAPTER_IMPL", DEFAULT_ADAPTER_ROUTE) or DEFAULT_ADAPTER_ROUTE,
                    ADAPTER_ROUTES, "TAILLOR_ADAPTER_IMPL")


def interpreting() -> bool:
    """True while ``TRITON_INTERPRET=1``: Triton kernels then run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, *, adapter: Optional[str] = None) -> Iterator[None]:
    """Run the ops of this scope (this thread or asyncio task) on ``backend`` ("eager" | "triton" | "auto") and,
    for the adapter op, on Triton route ``adapter`` ("split" | "fused"). None keeps the current value.
    Overrides ``TAILLOR_BACKEND`` / ``TAILLOR_ADAPTER_IMPL`` without touching ``os.environ``.

        with taillor.use_backend("eager"):
            y = layer(x)
    """
    current = _OVERRIDE.get()
    new = (current[0] if backend is None else _checked(backend, SETTINGS, "backend"),
           current[1] if adapter is None else _checked(adapter, ADAPTER_ROUTES, "adapter"))
    token = _OVERRIDE.set(new)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


# ---------------------------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------------------------
def impl_for(op: str, device_type: str, dtype: torch.dtype) -> Callable:
    """The callable that runs ``op`` on tensors of ``device_type`` and ``dtype`` under the current settings."""
    return _resolve(op, device_type, dtype, requested_backend(), adapter_route(), interpreting()).load()


def chosen_backend(op: str, device_type: str, dtype: torch.dtype) -> str:
    """The name of the implementation :func:`impl_for` would run (for reports and tests)."""
    return _resolve(op, device_type, dtype, requested_backend(), adapter_route(), interpreting()).backend


def _why_not(impl: Impl, device_type: str, dtype: torch.dtype, interpret: bool) -> Optional[str]:
    devices = impl.devices + (("cpu",) if impl.family == "triton" and interpret else ())
    if device_type not in devices:
        hint = " (or TRITON_INTERPRET=1 for CPU tensors)" if impl.family == "triton" else ""
        return f"it runs on {'/'.join(impl.devices)} tensors{hint}, got {device_type}"
    if impl.dtypes is not None and dtype not in impl.dtypes:
        return f"it supports {[str(d) for d in impl.dtypes]}, got {dtype}"
    return impl.available()


@functools.lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, dtype: torch.dtype, setting: str, route: str, interpret: bool) -> Impl:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    eager_impl = next(i for i in impls if i.family == "eager")
    if setting == "eager":
        return eager_impl
    triton_impls = [i for i in impls if i.family == "triton"]
    if setting == "triton" and triton_impls:
        # The route picks among the Triton implementations of the adapter op; other ops have one.
        impl = next((i for i in triton_impls if i.route in (None, route)), triton_impls[0])
        why = _why_not(impl, device_type, dtype, interpret)
        if why is not None:
            raise RuntimeError(f"TAILLOR_BACKEND=triton, but the {impl.backend} implementation of {op} cannot run: "
                               f"{why}; use TAILLOR_BACKEND=auto or eager, or taillor.use_backend('auto')")
        return impl
    # auto (and triton for ops without a Triton implementation): the first native one that can run, never the
    # interpreter (auto is for real devices).
    for impl in impls:
        if impl.family == "eager" or (impl.family == "triton" and impl.route not in (None, route)):
            continue
        if _why_not(impl, device_type, dtype, False) is None:
            return impl
    return eager_impl


# ---------------------------------------------------------------------------------------------------------------
# native modules (imported lazily, reported by taillor.info)
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _import_kernels() -> tuple[Optional[ModuleType], str]:
    try:
        return importlib.import_module("taillor._kernels"), ""
    except Exception as err:  # triton missing or broken: reported by info() and at forced use
        return None, f"{type(err).__name__}: {err}"


def triton_kernels() -> ModuleType:
    """The Triton kernel package, or a RuntimeError that says why it cannot be used."""
    module, why = _import_kernels()
    if module is None:
        raise RuntimeError(f"the Triton kernels cannot be imported ({why}); install triton, or set "
                           "TAILLOR_BACKEND=eager")
    return module


def triton_unavailable() -> Optional[str]:
    """None when the Triton kernels import, else why not."""
    module, why = _import_kernels()
    return None if module is not None else f"the Triton kernels cannot be imported ({why})"


def triton_status() -> str:
    why = triton_unavailable()
    return "available" if why is None else f"unavailable ({why})"


@functools.lru_cache(maxsize=None)
def cuda_extension() -> Optional[ModuleType]:
    """The compiled extension ``taillor._C``, or None when it was not built."""
    try:
        return importlib.import_module("taillor._C")
    except ImportError:
        return None


# Registration: one file per backend. Imported last, as they call register_impl.
from . import eager, triton, split, cuda_ext  # noqa: E402,F401  (isort: skip)
