"""The measurements: every method of a comparison timed in the same run, interleaved round by round (the order
rotates every round), and summarized by the median of per-round values, so that a loaded machine slows every
method alike. One function per suite, each returning table rows (dicts):

* adapter: forward (training mode, autograd on), backward (input grad + adapter grads) and both; "× floor" is the
  median over rounds of the per-round ratio to the frozen nn.Linear, "× PEFT" the same against PEFT LoRA.
  On CUDA, forward and backward are timed together, as a training loop queues them: each round issues
  ``steps_per_round`` fwd+bwd steps of a method back to back between two CUDA events, with no synchronisation in
  between (:func:`time_interleaved` with :class:`CudaEventTimer`). The device time per step is the figure; the host
  time of issuing a step (the Python of the layer, the registry and the launches) is reported beside it as
  ``host_ms``: where it exceeds the device time the step is host-bound. On the CPU each step is timed between
  synchronisations, forward and backward apart (:class:`SyncTimer` semantics).
* svd: time and top-k singular-value error of taillor.randomized_svd, torch.svd_lowrank (same sketch) and
  torch.linalg.svd.
* penalty: the Gram form against materializing ΔW (forward + backward).
* frames: taillor.build_frames (head mode) over every target layer of a Llama-shaped model against
  torch.linalg.svd and torch.svd_lowrank (same sketch), both on one layer's matrices and scaled to all layers.
  Each row is handed to ``emit`` as soon as it is measured, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..backends import cuda_extension
from ..frame import clear_frame_cache
from .methods import METHOD_LABELS, METHODS, build_adapter_methods, check_outputs
from .metrics import max_principal_angle, median, sigma_rel_error, sync, time_call
from .shapes import AdapterShape, FramesModel, PenaltyCase, SvdCase
from .spectral_methods import SVD_LABELS, FramesBench, penalty_functions, spectrum_matrix, svd_functions


class SyncTimer:
    """Wall time between device synchronisations: what the CPU path uses (host time and device time coincide)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def issued(self) -> float:
        """Seconds since start() (host side: the work has been issued, maybe not finished)."""
        return time.perf_counter() - self._t0

    def stop(self) -> float:
        """Seconds since start() once the device has finished the work."""
        sync(self.device)
        return time.perf_counter() - self._t0


class CudaEventTimer:
    """Device time between two CUDA events on the current stream; the host time of issuing the work between them
    is read when the end event is recorded, before waiting for the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._begin = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = 0.0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)  # an idle queue: the batch's own work, nothing left from before
        self._begin.record()
        self._t0 = time.perf_counter()

    def issued(self) -> float:
        self._end.record()
        return time.perf_counter() - self._t0

    def stop(self) -> float:
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1e3


def time_interleaved(runs: dict[str, Callable[[int], None]], rounds: int, steps: int, timer,
                     tick: Optional[Callable[[int], None]] = None) -> tuple[dict[str, list[float]],
                                                                             dict[str, list[float]]]:
    """Time every method the same way in the same run: per round (the order rotates every round), ``runs[key](steps)``
    issues ``steps`` steps between ``timer.start()`` and ``timer.issued()`` / ``timer.stop()``.

    Returns ({key: device seconds per step, one per round}, {key: host seconds per step to issue, one per round}).
    ``timer``: start(), issued() -> host seconds, stop() -> device seconds (:class:`CudaEventTimer`,
    :class:`SyncTimer`, or a fake in tests)."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"time_interleaved: steps and rounds must be >= 1, got steps={steps}, rounds={rounds}")
    keys = list(runs)
    device_s: dict[str, list[float]] = {k: [] for k in keys}
    host_s: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(rounds):
        shift = i % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            timer.start()
            runs[key](steps)
            host = timer.issued()
            device_s[key].append(timer.stop() / steps)
            host_s[key].append(host / steps)
            if tick:
                tick(0)
    return device_s, host_s


def paired_ratio(values: list[float], reference: list[float]) -> float:
    """The median over rounds of the per-round ratio values[i] / reference[i]."""
    return median(a / b for a, b in zip(values, reference))


def measure_adapter(shape: AdapterShape, device: torch.device, methods: Iterable[str] = METHODS,
                    warmup: int = 2, rounds: int = 7, tick: Optional[Callable[[int], None]] = None,
                    steps_per_round: int = 20, batch_timer=None) -> list[dict]:
    """Interleaved fwd/bwd timings of every method on one shape; one row per method (see module docstring).
    ``steps_per_round``: the fwd+bwd steps issued back to back per method and round on CUDA (unused on the CPU).
    ``batch_timer``: the timer of that batched path (default: CudaEventTimer on CUDA; given on the CPU, e.g. a
    SyncTimer, it runs the batched path there too — how tests exercise it without a GPU)."""
    cases, skipped, x, dy = build_adapter_methods(shape, device, methods)
    keys = list(cases)
    errors: dict[str, str] = {}
    for key in keys:  # warm-up (and torch.compile's compilation) outside the measurement
        try:
            for _ in range(max(warmup, 1 if key == "taillor-compile" else 0)):
                cases[key].step(x, dy, device)
        except Exception as err:  # noqa: BLE001 - one broken method must not hide the others
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    keys = [k for k in keys if k not in errors]
    checks = check_outputs(cases, keys, x, dy, device, shape.torch_dtype)
    if tick:
        tick(len(errors))
    if batch_timer is None and device.type == "cuda":
        batch_timer = CudaEventTimer(device)
    if batch_timer is not None:
        runs = {k: (lambda n, case=cases[k]: case.train_steps(x, dy, n)) for k in keys}
        both, host = time_interleaved(runs, rounds, steps_per_round, batch_timer, tick)
        return _adapter_rows(shape, device, cases, skipped, errors, checks, x, dy, rounds,
                             {k: None for k in keys}, {k: None for k in keys}, both,
                             {"host": host, "timing": f"{type(batch_timer).__name__}, {steps_per_round} fwd+bwd "
                                                      "steps per round"})
    fwd: dict[str, list[float]] = {k: [] for k in keys}
    bwd: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(rounds):
        order = keys[i % len(keys):] + keys[:i % len(keys)] if keys else []
        for key in order:
            f, b = cases[key].step(x, dy, device)
            fwd[key].append(f)
            bwd[key].append(b)
            if tick:
                tick(0)
    both = {k: [f + b for f, b in zip(fwd[k], bwd[k])] for k in keys}
    return _adapter_rows(shape, device, cases, skipped, errors, checks, x, dy, rounds, fwd, bwd, both,
                         {"timing": "synchronised, forward and backward apart"})


def _adapter_rows(shape, device, cases, skipped, errors, checks, x, dy, rounds, fwd, bwd, both, extra) -> list[dict]:
    """The rows of measure_adapter: per-round lists (seconds per step) of forward, backward (None: not timed
    apart) and fwd+bwd per method; ``extra``: "timing" (how), and "host" (host seconds per step) on CUDA."""
    rows = []
    keys = list(both)
    floor = "linear" if "linear" in keys else None
    for key in [m for m in METHODS if m in cases or m in skipped]:
        row = {"suite": "adapter", "shape": shape.name, **asdict(shape), "device": device.type, "method": key,
               "label": METHOD_LABELS[key], "rounds": rounds, "timing": extra["timing"]}
        if key in skipped or key in errors:
            row["skipped"] = skipped.get(key) or errors[key]
            rows.append(row)
            continue
        apart = fwd[key] is not None
        row.update(fwd_ms=1e3 * median(fwd[key]) if apart else None,
                   bwd_ms=1e3 * median(bwd[key]) if apart else None, fwd_bwd_ms=1e3 * median(both[key]))
        if "host" in extra:
            row["host_ms"] = 1e3 * median(extra["host"][key])
            row["host_bound"] = row["host_ms"] > row["fwd_bwd_ms"]
        if floor:
            row["ratio_fwd_bwd"] = paired_ratio(both[key], both[floor])
            if apart:
                row.update(ratio_fwd=paired_ratio(fwd[key], fwd[floor]), ratio_bwd=paired_ratio(bwd[key], bwd[floor]))
        if "peft" in keys:  # the peer, paired round by round like the floor
            row["ratio_to_peft"] = paired_ratio(both[key], both["peft"])
        row["peak_mb"], row["memory_kind"] = cases[key].peak_mb(x, dy, device)
        if key in checks:
            row["check"] = checks[key]
        rows.append(row)
    return rows



def measure_svd(case: SvdCase, device: torch.device, warmup: int = 1, rounds: int = 5,
                tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Interleaved timings and top-k singular-value errors of the three SVDs; "× ref" is relative to svd_lowrank."""
    W, sigma = spectrum_matrix(case.m, case.n, case.decay, device=device)
    fns = svd_functions(case)
    times: dict[str, list[float]] = {k: [] for k in fns}
    last: dict[str, tuple[Tensor, Tensor]] = {}  # (S, V) of each method's last round (the methods are seeded)
    for key, fn in fns.items():
        for _ in range(warmup):
            fn(W)
    for i in range(rounds):
        keys = list(fns)
        for key in keys[i % 3:] + keys[:i % 3]:
            seconds, (_, S, V) = time_call(lambda: fns[key](W), device)
            times[key].append(seconds)
            last[key] = (S, V)
            if tick:
                tick(0)
    errors = {key: sigma_rel_error(S, sigma) for key, (S, _) in last.items()}
    # subspace agreement with the exact top-k right singular vectors
    angles = {key: max_principal_angle(V, last["linalg.svd"][1]) for key, (_, V) in last.items()}
    rows = []
    for key in fns:
        rows.append({"suite": "svd", "shape": case.name, **asdict(case), "device": device.type, "method": key,
                     "label": SVD_LABELS[key], "rounds": rounds, "ms": 1e3 * median(times[key]),
                     "ratio_to_svd_lowrank": median(a / b for a, b in zip(times[key], times["svd_lowrank"])),
                     "speedup_vs_linalg_svd": median(b / a for a, b in zip(times[key], times["linalg.svd"])),
                     "sigma_rel_error": errors[key], "max_angle_rad": angles[key]})
    return rows



def penalty_step(fn: Callable[[], Tensor], params: list, device: torch.device) -> tuple[float, float, float]:
    """One forward + backward of a penalty closure: (forward seconds, forward+backward seconds, value)."""
    for p in params:
        p.grad = None
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    t1 = time.perf_counter()
    value.backward()
    sync(device)
    return t1 - t0, time.perf_counter() - t0, float(value.detach())


def measure_penalty(case: PenaltyCase, device: torch.device, warmup: int = 1, rounds: int = 7,
                    tick: Optional[Callable[[int], None]] = None) -> list[dict]:
    gram, naive, params = penalty_functions(case, device)
    fns = {"gram": gram, "naive": naive}
    fwd: dict[str, list[float]] = {k: [] for k in fns}
    both: dict[str, list[float]] = {k: [] for k in fns}
    values = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            penalty_step(fn, params, device)
    for i in range(rounds):
        for key in (("gram", "naive") if i % 2 == 0 else ("naive", "gram")):
            f, fb, values[key] = penalty_step(fns[key], params, device)
            fwd[key].append(f)
            both[key].append(fb)
            if tick:
                tick(0)
    labels = {"gram": "Gram form (taillor)", "naive": "naive (materialize ΔW)"}
    rows = []
    for key in fns:
        rows.append({"suite": "penalty", "shape": case.name, **asdict(case), "device": device.type, "method": key,
                     "label": labels[key], "rounds": rounds, "fwd_ms": 1e3 * median(fwd[key]),
                     "fwd_bwd_ms": 1e3 * median(both[key]),
                     "ratio_to_gram": median(a / b for a, b in zip(both[key], both["gram"])),
                     "value": values[key],
                     "rel_diff_to_naive": abs(values[key] - values["naive"]) / max(abs(values["naive"]), 1e-30)})
    return rows



@contextlib.contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` for the block (the bench is one thread; the old value is restored)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def measure_frames(model: FramesModel, device: torch.device, rounds: int = 1,
                   tick: Optional[Callable[[int], None]] = None,
                   emit: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """build_frames on every target of ``model`` vs torch.linalg.svd and a loop of torch.svd_lowrank, both on one
    layer's matrices and scaled to all layers (enough for the speed-up goals; the whole-model loop would cost
    minutes). The exact SVD of layer 0 (the error reference) comes first; each row goes to ``emit`` when measured
    (a row emitted before build_frames gets its "speedup_of_build_frames" once build_frames is measured)."""
    bench = FramesBench(model, device)
    bench.warmup()
    labels = {"build_frames": "taillor.build_frames", "build_frames-tf32": "taillor.build_frames, TF32 range finder",
              "linalg.svd": f"torch.linalg.svd (1 layer x {model.layers})",
              "svd_lowrank": f"torch.svd_lowrank, same sketch (1 layer x {model.layers})"}
    rows: list[dict] = []

    def add(key: str, seconds: list[float], result: dict, exact: dict) -> None:
        sigma_err, angle = bench.errors(result, exact)
        row = {"suite": "frames", **bench.describe(), "method": key, "label": labels[key], "rounds": len(seconds),
               "s": median(seconds), "sigma_rel_error_layer0": sigma_err, "max_angle_rad_layer0": angle}
        rows.append(row)
        ours = next((r["s"] for r in rows if r["method"] == "build_frames"), None)
        for r in rows:  # None until build_frames is measured
            r["speedup_of_build_frames"] = r["s"] / ours if ours else None
        if emit:
            emit(row)
        if tick:
            tick(0)

    seconds, exact = time_call(bench.exact_layer0, device)
    add("linalg.svd", [seconds * model.layers], exact, exact)
    ours_s, ours = [], None
    for _ in range(max(rounds, 1)):
        t, ours = time_call(bench.ours, device)
        ours_s.append(t)
    add("build_frames", ours_s, ours, exact)
    if device.type == "cuda" and cuda_extension() is not None:  # the opt-in TF32 range finder of the extension
        with _environ("TAILLOR_SVD_PRECISION", "tf32"):
            t, tf32 = time_call(bench.ours, device)
        add("build_frames-tf32", [t], tf32, exact)
    seconds, lowrank = time_call(bench.lowrank_layer0, device)
    add("svd_lowrank", [seconds * model.layers], lowrank, exact)
    clear_frame_cache()
    return rows
