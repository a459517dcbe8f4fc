"""TailLoRLinear against the frozen nn.Linear (the floor) and PEFT LoRA (the peer), one stem with
kernels/tail_adapter.py and tests/test_tail_adapter.py.

For each shape of the registry, in the same run: nn.Linear, PEFT LoRA at the same rank, TailLoRLinear eager,
TailLoRLinear Triton (CUDA: fused and split routes), torch.compile of the eager layer and the naive frame adapter
(x·V); forward, backward and both. Every TailLoR method's outputs and gradients are first compared with the eager
TailLoRLinear's (``extra_info["check"]``); a mismatch fails the benchmark. The floor runs in pytest-benchmark's ``setup`` before every round of the method (interleaved),
timed by us, and so does PEFT for the TailLoR methods (the peer of the "faster than PEFT" speed target); ``extra_info``
holds the medians of the per-round ratios to them (``ratio_to_floor``, ``ratio_to_peft``) and the peak memory.
"""
from __future__ import annotations

import pytest
import torch

from taillor.bench.methods import CHECKED_METHODS, build_adapter_methods, check_outputs
from taillor.bench.metrics import median

from .registry import adapter_params, rounds

_CACHE: dict = {}


def _methods(shape, device):
    """The built methods of one shape (kept until the next shape: GPU frames are large)."""
    key = (shape, device)
    if key not in _CACHE:
        _CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        _CACHE[key] = {"built": build_adapter_methods(shape, torch.device(device)), "warm": set(), "memory": {},
                       "checks": None}
    return _CACHE[key]


@pytest.mark.parametrize("shape,device,method,phase", adapter_params())
def test_tail_adapter(benchmark, shape, device, method, phase):
    entry = _methods(shape, device)
    cases, skipped, x, dy = entry["built"]
    if method in skipped:
        pytest.skip(skipped[method])
    dev = torch.device(device)
    case = cases[method]
    references = {"linear": []}  # name -> its time in each round
    if method.startswith("taillor") and "peft" in cases:
        references["peft"] = []
    warmup, n_rounds = rounds(device)
    for key in (method, *references):
        if key not in entry["warm"]:  # torch.compile compiles here, outside the measurement
            for _ in range(max(warmup, 1 if key == "taillor-compile" else 0)):
                cases[key].step(x, dy, dev)
            entry["warm"].add(key)
    if method in CHECKED_METHODS:  # every timed TailLoR output against the eager TailLoRLinear's, once per shape
        if entry["checks"] is None:
            entry["checks"] = check_outputs(cases, list(cases), x, dy, dev, shape.torch_dtype)
        benchmark.extra_info["check"] = entry["checks"][method]
        assert not entry["checks"][method].startswith("FAILED"), entry["checks"][method]
    method_times = []

    def setup():
        for key, times in references.items():
            f, y = cases[key].forward(x, dev)
            b = cases[key].backward(y, dy, dev)
            times.append({"fwd": f, "bwd": b, "fwd+bwd": f + b}[phase])
        if phase == "bwd":
            _, y = case.forward(x, dev)
            return (y,), {}
        return (), {}

    def target(y=None):
        if phase == "fwd":
            seconds, _ = case.forward(x, dev)
        elif phase == "bwd":
            seconds = case.backward(y, dy, dev)
        else:
            seconds = sum(case.step(x, dy, dev))
        method_times.append(seconds)

    benchmark.pedantic(target, setup=setup, rounds=n_rounds, warmup_rounds=0, iterations=1)
    if method not in entry["memory"]:
        entry["memory"][method] = case.peak_mb(x, dy, dev)
    peak, kind = entry["memory"][method]
    benchmark.group = f"tail_adapter {device} {shape.name} {phase}"
    benchmark.extra_info.update(
        shape=shape.name, tokens=shape.tokens, d_in=shape.d_in, d_out=shape.d_out, rank=shape.rank,
        dtype=shape.dtype, device=device, method=method, phase=phase, rounds=len(method_times),
        method_ms=1e3 * median(method_times), floor_ms=1e3 * median(references["linear"]),
        ratio_to_floor=median(m / f for m, f in zip(method_times, references["linear"])), peak_mb=peak,
        memory_kind=kind)
    if "peft" in references:
        benchmark.extra_info["ratio_to_peft"] = median(m / p for m, p in zip(method_times, references["peft"]))
