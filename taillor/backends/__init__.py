"""The backend registry: which implementation runs each taillor op, for a device type, a dtype, a setting and the
op's arguments.

Every op of :mod:`taillor.ops` has an eager implementation (PyTorch, every device, the default and the oracle's
closest neighbour) and may have native ones. Each backend registers its implementations in its own file with
:func:`register_impl`; an implementation may carry a ``priority`` and a ``predicate`` on the op's arguments:

    ===========================  ==================  =======================================  ==================
    op                           eager (every dev.)  triton family (CUDA), priority           cuda_ext (CUDA)
    ===========================  ==================  =======================================  ==================
    tail_adapter_fwd / _bwd      eager.py            onepass.py (20, large steps: predicate)
                                                     split.py (10), triton.py (fused, 0)
    spectral_projection_fwd/_bwd eager.py            triton.py
    spectral_penalty_fwd / _bwd  eager.py            triton.py
    spectral_penalty_batched_*   eager.py            triton.py
    randomized_svd               eager.py                                                     cuda_ext.py
    ===========================  ==================  =======================================  ==================

Dispatch is torch's: :func:`bind` registers each op's device kernel through torch.library (``register_kernel``)
for every device type an implementation names, as bitsandbytes registers its kernels; that kernel asks
:func:`impl_for`, which picks among the implementations for the tensors' device type and dtype by priority and
predicate. The setting comes from :func:`use_backend` (a context manager, per thread and task) or else from the
environment:

* ``TAILLOR_BACKEND=auto`` (default): per op, its native implementations that can run on the tensors' device and
  dtype (Triton for CUDA tensors when Triton imports; the CUDA extension for ``randomized_svd`` when it is built),
  highest priority first, the first whose predicate holds; the eager one otherwise.
* ``TAILLOR_BACKEND=eager``: every op eager.
* ``TAILLOR_BACKEND=triton``: ops with a Triton implementation must use it (a RuntimeError says why when they
  cannot: no Triton, a CPU tensor without ``TRITON_INTERPRET=1``, an unsupported dtype). Ops without one
  (``randomized_svd``) keep their ``auto`` choice: this setting never forces the CUDA extension.
* ``TAILLOR_ADAPTER_IMPL=auto|split|fused|onepass`` picks the Triton route of the adapter op. ``auto`` (default):
  onepass for large layer steps (the static rule of backends/onepass.py), split below. A named route is forced
  (its predicate is ignored).

The candidates are resolved once per (op, device type, dtype, setting, route, interpreter) and cached; a call then
only evaluates the predicates of the candidates above the first one without a predicate (none for most ops). The
Triton interpreter (``TRITON_INTERPRET=1``) is read at every call, never frozen at import: with it, the Triton
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
ADAPTER_ROUTES = ("auto", "split", "fused", "onepass")
DEFAULT_ADAPTER_ROUTE = "auto"  # the static rule of backends/onepass.py; docs/architecture.md "Adapter routes"

_OVERRIDE: contextvars.ContextVar[tuple[Optional[str], Optional[str]]] = contextvars.ContextVar(
    "taillor_backend", default=(None, None))


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. ``load()`` returns the callable (imports lazily); ``family`` is what the
    setting selects ("eager", "triton", "cuda_ext"); ``route`` tells the adapter routes apart; among the
    implementations that can run, the highest ``priority`` whose ``predicate`` (None: always) accepts the op's
    arguments runs."""
    op: str
    backend: str
    family: str
    devices: tuple[str, ...]
    load: Callable[[], Callable]
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    route: Optional[str] = None
    available: Callable[[], Optional[str]] = field(default=lambda: None)  # None, or why it cannot run
    priority: int = 0
    predicate: Optional[Callable[..., bool]] = None


_REGISTRY: dict[str, list[Impl]] = {}
_BOUND: dict[str, tuple[object, Callable, set]] = {}  # op -> (torch custom op, device kernel, device types bound)


def register_impl(op: str, backend: str, devices: tuple[str, ...], load: Callable[[], Callable], *,
                  family: Optional[str] = None, dtypes: Optional[tuple[torch.dtype, ...]] = None,
                  route: Optional[str] = None, available: Optional[Callable[[], Optional[str]]] = None,
                  priority: int = 0, predicate: Optional[Callable[..., bool]] = None) -> None:
    """Register implementation ``backend`` of ``op`` for ``devices`` (device types, e.g. ("cuda",)).

    ``predicate(*args)`` (the op's arguments; cheap, it runs at every call) limits it to some shapes; among the
    implementations that can run on the tensors' device type and dtype, the highest ``priority`` whose predicate
    holds is chosen (registration order breaks ties). Once the op exists (:func:`bind`), a device type no
    implementation had before gets the op's device kernel through torch.library."""
    impls = _REGISTRY.setdefault(op, [])
    if any(i.backend == backend for i in impls):
        raise ValueError(f"op {op!r} already has a {backend!r} implementation")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate of {op}/{backend} must be callable, got {type(predicate).__name__}")
    impls.append(Impl(op, backend, family or backend, tuple(devices), load, dtypes, route,
                      available or (lambda: None), int(priority), predicate))
    if op in _BOUND:
        _bind_devices(op)
    _resolve.cache_clear()


def unregister_impl(op: str, backend: str) -> None:
    """Remove implementation ``backend`` of ``op`` (plugins and tests); its device kernels stay bound (they ask
    the registry at every call, which then no longer offers it)."""
    impls = _REGISTRY.get(op, [])
    kept = [i for i in impls if i.backend != backend]
    if len(kept) == len(impls):
        raise KeyError(f"op {op!r} has no {backend!r} implementation")
    if kept:
        _REGISTRY[op] = kept
    else:
        del _REGISTRY[op]
    _resolve.cache_clear()


def bind(op_name: str, op, kernel: Callable) -> None:
    """Register ``kernel`` (which asks :func:`impl_for`) as ``op``'s kernel, through torch.library, for every
    device type an implementation of ``op_name`` names (meta excepted: it is the op's fake implementation)."""
    _BOUND[op_name] = (op, kernel, set())
    _bind_devices(op_name)


def _bind_devices(op_name: str) -> None:
    op, kernel, bound = _BOUND[op_name]
    for device in sorted({d for i in _REGISTRY.get(op_name, ()) for d in i.devices} - bound - {"meta"}):
        op.register_kernel(device, kernel)
        bound.add(device)


def bound_devices(op_name: str) -> tuple[str, ...]:
    """The device types whose torch kernel of ``op_name`` is the registry's (sorted)."""
    return tuple(sorted(_BOUND[op_name][2])) if op_name in _BOUND else ()


def implementations(op: str) -> tuple[Impl, ...]:
    """Every registered implementation of ``op``, in registration order."""
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
    """The adapter's Triton route: :func:`use_backend`'s, else ``TAILLOR_ADAPTER_IMPL`` (default "auto")."""
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
    for the adapter op, on Triton route ``adapter`` ("auto" | "split" | "fused" | "onepass"). None keeps the
    current value.
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
def impl_for(op: str, device_type: str, dtype: torch.dtype, args: Optional[tuple] = None) -> Callable:
    """The callable that runs ``op`` on ``args`` (tensors of ``device_type`` and ``dtype``) under the current
    settings: the first candidate (highest priority first) whose predicate accepts ``args``, else the candidate
    without a predicate that ends the list. Without ``args``, candidates with a predicate are passed over."""
    guarded, _, fn = _resolve(op, device_type, dtype, requested_backend(), adapter_route(), interpreting())
    if guarded and args is not None:
        for predicate, _, guarded_fn in guarded:
            if predicate(*args):
                return guarded_fn
    return fn


def chosen_backend(op: str, device_type: str, dtype: torch.dtype, args: Optional[tuple] = None) -> str:
    """The name of the implementation :func:`impl_for` would run (for reports and tests)."""
    guarded, impl, _ = _resolve(op, device_type, dtype, requested_backend(), adapter_route(), interpreting())
    if args is not None:
        for predicate, guarded_impl, _ in guarded:
            if predicate(*args):
                return guarded_impl.backend
    return impl.backend


def _why_not(impl: Impl, device_type: str, dtype: torch.dtype, interpret: bool) -> Optional[str]:
    devices = impl.devices + (("cpu",) if impl.family == "triton" and interpret else ())
    if device_type not in devices:
        hint = " (or TRITON_INTERPRET=1 for CPU tensors)" if impl.family == "triton" else ""
        return f"it runs on {'/'.join(impl.devices)} tensors{hint}, got {device_type}"
    if impl.dtypes is not None and dtype not in impl.dtypes:
        return f"it supports {[str(d) for d in impl.dtypes]}, got {dtype}"
    return impl.available()


def _candidates(ranked: list[Impl], fallback: Impl, route: str):
    """(guarded, final impl, final callable): ``guarded`` = ((predicate, impl, callable), ...) best first, up to
    the first implementation without a predicate (the final one; ``fallback`` if none). A route named explicitly
    (not "auto") is forced: its implementations' predicates are dropped."""
    guarded = []
    for impl in ranked:
        predicate = None if (impl.route is not None and route != "auto") else impl.predicate
        if predicate is None:
            return tuple(guarded), impl, impl.load()
        guarded.append((predicate, impl, impl.load()))
    return tuple(guarded), fallback, fallback.load()


@functools.lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, dtype: torch.dtype, setting: str, route: str, interpret: bool):
    """The candidates of ``op`` for a device type, dtype and setting, best first (see :func:`_candidates`)."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    eager_impl = next(i for i in impls if i.family == "eager")
    if setting == "eager":
        return (), eager_impl, eager_impl.load()
    # Highest priority first; registration order among equals (sorted is stable).
    routed = sorted((i for i in impls if i.route is None or route == "auto" or i.route == route),
                    key=lambda i: -i.priority)
    triton_impls = [i for i in routed if i.family == "triton"]
    if setting == "triton" and triton_impls:
        # Forced: the Triton implementations (of the route, for the adapter op) must be able to run.
        reasons = [(i, _why_not(i, device_type, dtype, interpret)) for i in triton_impls]
        usable = [i for i, why in reasons if why is None]
        if not usable:
            impl, why = reasons[0]
            raise RuntimeError(f"TAILLOR_BACKEND=triton, but the {impl.backend} implementation of {op} cannot run: "
                               f"{why}; use TAILLOR_BACKEND=auto or eager, or taillor.use_backend('auto')")
        return _candidates(usable, usable[-1], route)
    # auto (and triton for ops without a Triton implementation): the native ones that can run, never the
    # interpreter (auto is for real devices), best first; eager last.
    native = [i for i in routed if i.family != "eager" and _why_not(i, device_type, dtype, False) is None]
    return _candidates(native, eager_impl, route)


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
from . import eager, triton, split, onepass, cuda_ext  # noqa: E402,F401  (isort: skip)
