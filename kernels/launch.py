"""Launch rules shared by every Triton launcher: interpreter, device guard, input checks, tuning, recording.

* Interpreter. ``TRITON_INTERPRET=1`` is read at every launch (:func:`interpreting`), never frozen at import: the
  kernels are always imported as compiled ``JITFunction`` objects, and under the interpreter a launch runs an
  interpreted twin built from the same Python source (its helper ``@triton.jit`` functions twinned too), so one
  process can test the interpreter on CPU tensors and the compiled kernels on CUDA tensors.
* Device guard: every launch runs under ``torch.cuda.device(<the tensors' device>)``, not the current device.
* Tuning without re-tuning per length (:class:`Tuner`): the config of a launch site is benchmarked once per
  *bucket* (every size rounded up to a power of two, so 3000 and 4000 tokens share the 4096 entry) and cached in
  memory for the process. While a CUDA graph is being captured, or with ``TAILLOR_AUTOTUNE=0``, nothing is
  benchmarked: a cached entry or the first config (the heuristic default) runs.
* Recording (:func:`recording`): launches are captured instead of run, with their arguments, constexprs, config
  list and tuning key. ``taillor check-kernels`` records the real call sites of the launchers on meta tensors
  and compiles exactly those specializations; tests use it to inspect tuning keys without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import triton
import triton.language
import triton.testing
from triton.runtime.jit import JITFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPES = {torch.float32: triton.language.float32, torch.float16: triton.language.float16,
             torch.bfloat16: triton.language.bfloat16}


def interpreting() -> bool:
    """True while ``TRITON_INTERPRET=1`` (read now): launches run in the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# interpreted twins
# ---------------------------------------------------------------------------------------------------------------
_TWINS: dict = {}


def interpreted(kernel):
    """The interpreter's version of ``kernel`` (a JITFunction), with every JITFunction it calls twinned too."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):  # imported while TRITON_INTERPRET=1 was already set
        return kernel
    fn = kernel.fn
    twin = _TWINS.get(fn)
    if twin is None:
        # A copy of the function over a copy of its module's globals: the interpreter executes its rewritten source
        # in those globals, where the helper kernels must be interpreted ones too. The real module is untouched.
        namespace = dict(fn.__globals__)
        twin_fn = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        twin_fn.__module__, twin_fn.__qualname__ = fn.__module__, fn.__qualname__
        twin = _TWINS[fn] = InterpretedFunction(twin_fn)
        for name, value in list(namespace.items()):
            if isinstance(value, JITFunction):
                namespace[name] = interpreted(value)
    return twin


@contextlib.contextmanager
def _interpreted_language() -> Iterator[None]:
    """Triton's own ``@jit`` library functions (``tl.cdiv``, ``tl.sum``, ...) as interpreted twins, for the
    duration of one interpreted launch (they are JITFunctions when triton was imported without the interpreter)."""
    import triton.language as language
    import triton.language.standard as standard
    saved = [(module, name, value) for module in (language, standard) for name, value in vars(module).items()
             if isinstance(value, JITFunction)]
    for module, name, value in saved:
        setattr(module, name, interpreted(value))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (launch on the tensors' device), else a no-op."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class DeviceInfo:
    sm_count: int
    shared_limit: int  # opt-in shared memory per block, bytes
    capability: tuple[int, int]


_DEVICE_INFO: dict = {}


def device_info(device: torch.device) -> Optional[DeviceInfo]:
    """SM count, shared-memory limit and compute capability of a CUDA device (None for other devices; while
    recording, meta tensors stand for the device given to :func:`recording`)."""
    if device.type == "meta" and _RECORDING_DEVICE is not None:
        return _RECORDING_DEVICE
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(index)
        shared = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        _DEVICE_INFO[index] = DeviceInfo(props.multi_processor_count, int(shared), (props.major, props.minor))
    return _DEVICE_INFO[index]


# ---------------------------------------------------------------------------------------------------------------
# checks (every launcher validates at the host, before any launch)
# ---------------------------------------------------------------------------------------------------------------
def check_device(**tensors) -> None:
    """All tensors on one device: CUDA, or any device under the interpreter (how CI runs the kernels)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all inputs must share a device")
    if first.type != "cuda" and not interpreting() and _RECORDING is None:
        raise ValueError(f"{first_name} is on {first}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")


def check_2d(name, t, rows=None, cols=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = (rows if rows is not None else "*", cols if cols is not None else "*")
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({want[0]}, {want[1]})")


def check_dtype(name, t, dtype=None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but must match {dtype}")


def check_row_major(name, t) -> None:
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {tuple(t.stride())}); "
                         "call .contiguous() first")


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """The op schemas' "not computed" output: an empty 1-D tensor."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------------------------
# configs and tuning
# ---------------------------------------------------------------------------------------------------------------
def pow2_block(n: int, cap: int) -> int:
    """A tile width for a dimension of size n: the next power of two, at least 16 (tl.dot's minimum), at most cap."""
    return min(cap, max(16, triton.next_power_of_2(max(int(n), 1))))


def bucket(n: int) -> int:
    """The tuning bucket of a size: the next power of two (0 and 1 stay themselves)."""
    return triton.next_power_of_2(int(n)) if n > 1 else int(n)


def smem_estimate(config: triton.Config, itemsize: int, n_width: int = 0) -> int:
    """Pipelined operand buffers of a GEMM-like config: (BLOCK_M + BLOCK_N)·BLOCK_K·itemsize per stage."""
    kw = config.kwargs
    return (kw["BLOCK_M"] + kw.get("BLOCK_N", n_width)) * kw["BLOCK_K"] * itemsize * max(config.num_stages, 1)


def configs_within(configs: Sequence[triton.Config], limit: int, itemsize: int,
                   n_width: int = 0) -> list[triton.Config]:
    """The configs whose estimated shared memory is at most ``limit`` bytes; never empty (else the smallest)."""
    kept = [c for c in configs if smem_estimate(c, itemsize, n_width) <= limit]
    return kept or [min(configs, key=lambda c: smem_estimate(c, itemsize, n_width))]


def fitting(configs: Sequence[triton.Config], device: torch.device, itemsize: int,
            n_width: int = 0) -> list[triton.Config]:
    """The configs that fit ``device``'s shared memory (all of them off CUDA). ``itemsize`` is the largest
    element size among the pipelined operands (they are staged in shared memory before any conversion)."""
    info = device_info(device)
    return list(configs) if info is None else configs_within(configs, info.shared_limit, itemsize, n_width)


def autotune_enabled() -> bool:
    return os.environ.get("TAILLOR_AUTOTUNE", "1").strip() not in ("0", "false", "no")


_CONFIG_ERRORS = tuple(getattr(triton.runtime.errors, name) for name in ("OutOfResources", "PTXASError")
                       if hasattr(triton.runtime.errors, name))


class Tuner:
    """Best config per tuning key, benchmarked once per key (see the module docstring)."""

    def __init__(self):
        self.best: dict = {}
        self.benchmarks = 0  # configs timed so far (tests check reuse with it)

    def choose(self, key, configs: Sequence[triton.Config], run: Callable[[triton.Config], None],
               can_benchmark: bool) -> triton.Config:
        if len(configs) == 1:
            return configs[0]
        cfg = self.best.get(key)
        if cfg is not None:
            return cfg
        if not can_benchmark:
            return configs[0]
        timings = []
        for candidate in configs:
            self.benchmarks += 1
            try:
                timings.append((benchmark(lambda: run(candidate)), candidate))
            except _CONFIG_ERRORS:  # too much shared memory or registers for this GPU: not a candidate here
                continue
        cfg = min(timings, key=lambda t: t[0])[1] if timings else configs[0]
        self.best[key] = cfg
        return cfg


def benchmark(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` on the GPU (a short run: tuning happens once per bucket)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


TUNER = Tuner()
_FORCED_CONFIG: Optional[int] = None


@contextlib.contextmanager
def forced_config(index: int) -> Iterator[None]:
    """Launch every site with its ``index``-th config (modulo the list's length), untuned: lets the compiled-kernel
    tests check every config of every kernel, not only the ones a tuner picks on the test machine."""
    global _FORCED_CONFIG
    previous, _FORCED_CONFIG = _FORCED_CONFIG, index
    try:
        yield
    finally:
        _FORCED_CONFIG = previous


# ---------------------------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded launch: everything ``taillor check-kernels`` needs to compile it as run time would."""
    kernel: object
    args: tuple
    constexprs: dict
    configs: list
    tune_key: tuple
    site: str = ""
    smem: tuple = (4, 0)  # (itemsize, n_width) for configs_within


_RECORDING: Optional[list] = None
_RECORDING_DEVICE: Optional[DeviceInfo] = None


@contextlib.contextmanager
def recording(sm_count: Optional[int] = None) -> Iterator[list]:
    """Capture launches (a list of :class:`Launch`) instead of running them; tensors may be meta tensors, which
    then stand for a GPU with ``sm_count`` SMs (for split-K decisions) and unlimited shared memory (every config
    is kept: ``taillor check-kernels`` checks each against the real limits)."""
    global _RECORDING, _RECORDING_DEVICE
    previous = _RECORDING, _RECORDING_DEVICE
    _RECORDING = []
    _RECORDING_DEVICE = None if sm_count is None else DeviceInfo(sm_count, 1 << 30, (9, 0))
    try:
        yield _RECORDING
    finally:
        _RECORDING, _RECORDING_DEVICE = previous


def launch(kernel, grid: Callable[[dict], tuple], args: Sequence, constexprs: dict,
           configs: Sequence[triton.Config], interpret_config: dict, tune_dims: Sequence[int],
           site: str, smem: tuple = (4, 0)) -> None:
    """Launch ``kernel`` over ``grid(meta)`` with the best of ``configs`` for the bucket of ``tune_dims``.

    ``args`` are the runtime arguments in order (tensors first among them set the device), ``constexprs`` the
    call's flags. Under the interpreter the single ``interpret_config`` runs (autotuning several configs does not
    work there). The tuning key is (site, flags, tensor dtypes, bucketed dims). ``smem`` = (itemsize, n_width)
    says how the configs' shared memory was estimated (kept for ``taillor check-kernels``).
    """
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    key = (site, tuple(sorted(constexprs.items())), dtypes, tuple(bucket(d) for d in tune_dims))
    if _RECORDING is not None:
        _RECORDING.append(Launch(kernel, tuple(args), dict(constexprs), list(configs), key, site, smem))
        return
    if interpreting():
        meta = {**constexprs, **interpret_config}
        with _interpreted_language():
            interpreted(kernel)[grid(meta)](*args, **meta)
        return
    ref = next(a for a in args if isinstance(a, torch.Tensor))

    def run(cfg: triton.Config) -> None:
        meta = {**constexprs, **cfg.kwargs}
        kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    with device_guard(ref):
        if _FORCED_CONFIG is not None:
            cfg = configs[_FORCED_CONFIG % len(configs)]
        else:
            can_benchmark = autotune_enabled() and not torch.cuda.is_current_stream_capturing()
            cfg = TUNER.choose(key + (ref.device.index,), list(configs), run, can_benchmark)
        run(cfg)
