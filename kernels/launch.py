"""Launch rules shared by every Triton launcher: interpreter, device guard, configs, tuning, recording.

* Interpreter. ``TRITON_INTERPRET=1`` is read at every launch (:func:`interpreting`), never frozen at import: the
  kernels are always imported as compiled ``JITFunction`` objects, and under the interpreter a launch runs an
  interpreted twin built from the same Python source (its helper ``@triton.jit`` functions twinned too), so one
  process can test the interpreter on CPU tensors and the compiled kernels on CUDA tensors.
* Device guard: every launch runs under ``torch.cuda.device(<the tensors' device>)``, not the current device.
* Tuning without re-tuning per length (:class:`Tuner`): the config of a launch site is benchmarked once per
  *bucket* (every size rounded up to a power of two, so 3000 and 4000 tokens share the 4096 entry) and cached in
  memory for the process. While a CUDA graph is being captured, or with ``TAILLOR_AUTOTUNE=0``, nothing is
  benchmarked: a cached entry or the first config (the heuristic default) runs.
* Configs: the tile configs and block-size caps of every kernel, the split-K rule, and the shared-memory filter.
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
# outputs
# ---------------------------------------------------------------------------------------------------------------
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


# Tile configs of every kernel, in one place. On the GPU a launch site tunes over its list (configs that do not fit
# the device's shared memory are dropped first, see fitting()); `taillor check-kernels` compiles every one for
# sm_80 and sm_90 at the specializations of the real call sites and checks its shared memory. Under the
# interpreter the single *_INTERPRET_CONFIG runs (autotuning several configs does not work there).

# Pair kernel (kernels/pair_gemm.py): two tall-skinny products per launch. Each pipelined loop holds num_stages
# buffers of (BLOCK_M + BLOCK_N)·BLOCK_K elements; BLOCK_K 64/128 streams the long operand in wide chunks (these
# products are memory bound).
PAIR_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# fp32-arithmetic call sites (penalty gradients, head factors: small problems) use one fixed config.
PAIR_FP32_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
PAIR_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 64}
PAIR_MAX_BLOCK_N = 64  # widest output tile along the rank dimension; wider outputs get more programs
# Split-K of the pair kernel (split_count): only when every chunk keeps at least SPLIT_MIN_CHUNK elements of K.
SPLIT_MIN_CHUNK = 1024
MAX_SPLIT = 16

# Fused adapter GEMM (kernels/tail_adapter.py). Pipelined shared memory is (BLOCK_M + BLOCK_N)·BLOCK_K·itemsize
# per stage. The last two of the 16-bit list (BLOCK_K 64, 128×256 tiles, 8 warps) are the Hopper-sized ones, for
# 16-bit inputs only: with fp32 operands they would need 288 KiB.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
GEMM_16BIT_CONFIGS = GEMM_CONFIGS + [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
GEMM_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
GEMM_MAX_BLOCK_R = 64  # the rank chunk of the fused GEMM's extra K-chunk
# The fused GEMM with a fold (the onepass route's dx GEMM also writing dP's row-block partials): its workspace
# has one slice per row block, so every config of such a launch has this BLOCK_M (the interpreter's too).
FOLD_BLOCK_M = 128

# One pass over dy (kernels/tail_adapter_onepass.py): (BLOCK_M, BLOCK_N) tiles of dy, the rank padded to
# BLOCK_R <= ONEPASS_MAX_R (wider ranks take the fused route's backward). Loads are not pipelined across the
# read-modify-write of the dQ partials, so each config holds one dy tile and one Q tile at a time.
DY_PASS_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
DY_PASS_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}
ONEPASS_MAX_R = 64


def gemm_configs(dtype: torch.dtype) -> list[triton.Config]:
    """The fused GEMM's tuning list for operands of ``dtype``."""
    return GEMM_CONFIGS if dtype == torch.float32 else GEMM_16BIT_CONFIGS


# Penalty Gram kernel (kernels/spectral_penalty.py): fp32 FMA dots on r×r tiles, a tiny O(k·r²) problem, so one
# fixed config (not worth autotuning) and small tiles to keep registers and compile time low.
GRAM_CONFIG = triton.Config({}, num_warps=4, num_stages=2)
GRAM_MAX_BLOCK_R = 32
GRAM_BLOCK_L = 32


def split_count(programs: int, k_len: int, sm_count: Optional[int]) -> int:
    """Split-K chunks for a grid of ``programs`` with a reduction of length ``k_len``: enough to fill the SMs,
    at most MAX_SPLIT, and never chunks shorter than SPLIT_MIN_CHUNK. 1 without a device (interpreter)."""
    if not sm_count or programs >= sm_count:
        return 1
    return max(1, min(sm_count // max(programs, 1), k_len // SPLIT_MIN_CHUNK, MAX_SPLIT))


def smem_estimate(config: triton.Config, itemsize: int, n_width: int = 0) -> int:
    """Pipelined operand buffers of a GEMM-like config: (BLOCK_M + BLOCK_N)·BLOCK_K·itemsize per stage."""
    kw = config.kwargs
    if "BLOCK_K" not in kw:  # a tile kernel without a K loop (the dy pass): a dy tile and an (BLOCK_N, n_width) one
        return (kw["BLOCK_M"] + n_width) * kw["BLOCK_N"] * itemsize * max(config.num_stages, 1)
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


def is_recording() -> bool:
    """True inside :func:`recording`: launches are captured, and meta tensors stand for a GPU's."""
    return _RECORDING is not None


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
