"""What the adapter suite compares: the frozen nn.Linear (the floor), PEFT LoRA (the peer), TailLoRLinear on each
backend (eager, every Triton route of ``taillor.backends.ADAPTER_ROUTES``, torch.compile) and the naive x·V frame
adapter, with the check of
every TailLoR output against eager TailLoRLinear's ("vs eager"; FAILED marks a mismatch), so that a fast number
never hides a wrong result.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..layer import TailLoRLinear
from .metrics import backend, saved_bytes, sync
from .shapes import AdapterShape


# One method per Triton route the registry knows, so that a new route is timed without a change here.
ROUTE_METHODS = tuple(f"taillor-{route}" for route in backends.ADAPTER_ROUTES)
METHODS = ("linear", "peft", "taillor-eager", *ROUTE_METHODS, "taillor-compile", "naive-xv")
METHOD_LABELS = {
    "linear": "nn.Linear (frozen)",
    "peft": "PEFT LoRA",
    "taillor-eager": "TailLoRLinear eager",
    **{m: f"TailLoRLinear Triton {m[len('taillor-'):]}" for m in ROUTE_METHODS},
    "taillor-compile": "TailLoRLinear compile",
    "naive-xv": "naive x·V frame",
}


class NaiveFrameAdapter(nn.Module):
    """The naive full-frame adapter: y = base(x) + s·(((x V) Aᵀ) Bᵀ) Uᵀ — activations projected through the frame.

    TailLoRLinear never does this (it costs 4·T·d·k extra FLOPs); it is a row of the table to show why.
    """

    def __init__(self, base: nn.Linear, U: Tensor, V: Tensor, A: Tensor, B: Tensor, scaling: float):
        super().__init__()
        self.base = base
        dtype = base.weight.dtype
        self.register_buffer("U", U.to(dtype))
        self.register_buffer("V", V.to(dtype))
        self.lora_A = nn.Parameter(A.detach().clone().to(dtype))
        self.lora_B = nn.Parameter(B.detach().clone().to(dtype))
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * ((((x @ self.V) @ self.lora_A.t()) @ self.lora_B.t()) @ self.U.t())


@dataclass
class AdapterMethod:
    """One row of the adapter table: a callable module, its trainable parameters and the backend it runs under."""
    key: str
    module: Callable[[Tensor], Tensor]
    params: list
    exclude: list                     # tensors not counted as saved activations (parameters, buffers)
    backend: Optional[str] = None

    def forward(self, x: Tensor, device: torch.device) -> tuple[float, Tensor]:
        """A training-mode forward (autograd on) after clearing gradients; returns (seconds, y)."""
        x.grad = None
        for p in self.params:
            p.grad = None
        with backend(self.backend):
            sync(device)
            t0 = time.perf_counter()
            y = self.module(x)
            sync(device)
            return time.perf_counter() - t0, y

    def backward(self, y: Tensor, dy: Tensor, device: torch.device) -> float:
        """y.backward(dy) (input grad and adapter grads); returns seconds."""
        with backend(self.backend):
            sync(device)
            t0 = time.perf_counter()
            y.backward(dy)
            sync(device)
            return time.perf_counter() - t0

    def step(self, x: Tensor, dy: Tensor, device: torch.device) -> tuple[float, float]:
        """One training step; returns (forward seconds, backward seconds)."""
        f, y = self.forward(x, device)
        return f, self.backward(y, dy, device)

    def train_steps(self, x: Tensor, dy: Tensor, steps: int) -> None:
        """``steps`` training steps (gradients cleared as zero_grad(set_to_none=True) does, forward, backward) in
        one backend scope and without any synchronisation: the way a training loop queues CUDA work, so that a
        CUDA timer sees the device time and the Python cost of issuing a step is measured apart from it."""
        params = self.params
        with backend(self.backend):
            for _ in range(steps):
                x.grad = None
                for p in params:
                    p.grad = None
                self.module(x).backward(dy)

    def outputs(self, x: Tensor, dy: Tensor, device: torch.device) -> dict[str, Tensor]:
        """One fwd+bwd: {"y", "dx", "dA", "dB"} (the adapter's two parameters, in order), detached copies."""
        _, y = self.forward(x, device)
        self.backward(y, dy, device)
        out = {"y": y.detach().clone(), "dx": x.grad.detach().clone()}
        out.update({name: p.grad.detach().clone() for name, p in zip(("dA", "dB"), self.params)})
        return out

    def peak_mb(self, x: Tensor, dy: Tensor, device: torch.device) -> tuple[Optional[float], str]:
        """(MB, kind): CUDA peak over one fwd+bwd, or on the CPU the bytes saved for backward."""
        x.grad = None
        for p in self.params:
            p.grad = None
        with backend(self.backend):
            if device.type == "cuda":
                sync(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                self.module(x).backward(dy)
                sync(device)
                return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda peak"
            try:
                return saved_bytes(lambda: self.module(x), self.exclude + [x]) / 2**20, "saved for backward"
            except Exception:  # noqa: BLE001 - e.g. saved-tensor hooks under torch.compile
                return None, "saved for backward"


# Every timed TailLoR output is compared with the eager TailLoRLinear's in the same run. Both are within the test
# suite's oracle tolerance (tests/conftest.py TOLERANCE["oracle"], normalized max error) of the float64 result, so they may
# differ by twice that; tests/test_benchmarks_smoke.py keeps this table equal to 2 x the suite's.
MATCH_TOLERANCE = {torch.float32: 4e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
CHECKED_METHODS = (*ROUTE_METHODS, "taillor-compile", "naive-xv")


def output_check(outputs: dict[str, Tensor], reference: dict[str, Tensor], dtype: torch.dtype) -> str:
    """"ok (...)" when every output matches the eager reference within MATCH_TOLERANCE, else "FAILED: ..."."""
    diffs = {}
    for name, ref in reference.items():
        got = outputs[name]
        scale = ref.double().abs().max().clamp_min(1e-30)
        bad = got.shape != ref.shape or not bool(torch.isfinite(got).all())
        diffs[name] = float("inf") if bad else float((got.double() - ref.double()).abs().max() / scale)
    worst = max(diffs, key=diffs.get)
    summary = ", ".join(f"{n} {d:.1e}" for n, d in diffs.items())
    if diffs[worst] > MATCH_TOLERANCE[dtype]:
        return f"FAILED: {worst} differs from eager by {diffs[worst]:.2e} > {MATCH_TOLERANCE[dtype]:.0e} ({summary})"
    return f"ok (max diff to eager: {summary})"


def _peft_lora(base: nn.Linear, rank: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer around ``base`` (adapters in the base dtype, PEFT's fastest setting; dropout 0)."""
    import peft

    class Holder(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"])
    try:
        model = peft.get_peft_model(Holder(base), config, autocast_adapter_dtype=False)
    except TypeError:  # older PEFT without autocast_adapter_dtype
        model = peft.get_peft_model(Holder(base), config)
    layer = model.base_model.model.lin
    # Non-zero B so the adapter path is not a multiplication by zero (the cost is the same either way).
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_(0, 1e-3)
    return layer


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        backends.triton_kernels()
        return True
    except RuntimeError:
        return False


def build_adapter_methods(shape: AdapterShape, device: torch.device, methods: Iterable[str] = METHODS,
                          seed: int = 0) -> tuple[dict[str, AdapterMethod], dict[str, str], Tensor, Tensor]:
    """The modules of one adapter shape: ({key: method}, {key: reason skipped}, x, dy).

    Every method wraps its own copy of the same frozen base layer (same weights); the TailLoR variants (eager,
    Triton, compile) share one TailLoRLinear (``shape.frame``, alpha = 2r) and differ only in the backend. The
    naive x·V adapter is the full frame's alone.
    """
    dtype = shape.torch_dtype
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(shape.d_in, shape.d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(shape.d_out, shape.d_in, generator=gen) / math.sqrt(shape.d_in))
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    x = (torch.randn(shape.tokens, shape.d_in, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(shape.tokens, shape.d_out, generator=gen).to(device=device, dtype=dtype)
    alpha = 2.0 * shape.rank
    wanted = [m for m in METHODS if m in set(methods)]
    out: dict[str, AdapterMethod] = {}
    skipped: dict[str, str] = {}
    layer = None
    if any(m.startswith("taillor") or m == "naive-xv" for m in wanted):
        layer = TailLoRLinear.from_linear(copy.deepcopy(base), rank=shape.rank, alpha=alpha, frame=shape.frame,
                                          seed=seed)
        with torch.no_grad():
            layer.lora_B.normal_(0, 1e-3)
        layer_params = [layer.lora_A, layer.lora_B]
        layer_exclude = [t for t in layer.parameters()] + [t for t in layer.buffers()]
    for key in wanted:
        if key == "linear":
            lin = copy.deepcopy(base)
            out[key] = AdapterMethod(key, lin, [], [lin.weight])
        elif key == "peft":
            try:
                peft_layer = _peft_lora(copy.deepcopy(base), shape.rank, alpha)
            except ImportError as err:
                skipped[key] = f"peft not installed ({err})"
                continue
            params = [p for p in peft_layer.parameters() if p.requires_grad]
            out[key] = AdapterMethod(key, peft_layer, params, list(peft_layer.parameters()))
        elif key == "taillor-eager":
            out[key] = AdapterMethod(key, layer, layer_params, layer_exclude, backend="eager")
        elif key in ROUTE_METHODS:
            if not triton_available(device):
                skipped[key] = "needs CUDA and Triton" if device.type != "cuda" else "Triton kernels unavailable"
                continue
            out[key] = AdapterMethod(key, layer, layer_params, layer_exclude,
                                     backend="triton:" + key[len("taillor-"):])
        elif key == "taillor-compile":
            # A fresh compilation per shape: dynamo's recompile limit would otherwise silently fall back to
            # eager after a few shapes (its cache is keyed on TailLoRLinear.forward, shared by all instances).
            torch._dynamo.reset()
            out[key] = AdapterMethod(key, torch.compile(layer), layer_params, layer_exclude, backend="eager")
        elif key == "naive-xv":
            if shape.frame != "full":
                skipped[key] = "the naive x·V adapter projects through the full frame only"
                continue
            naive = NaiveFrameAdapter(copy.deepcopy(base), layer.frame.U, layer.frame.V, layer.lora_A.detach(),
                                      layer.lora_B.detach(), layer.scaling)
            params = [naive.lora_A, naive.lora_B]
            out[key] = AdapterMethod(key, naive, params, list(naive.parameters()) + list(naive.buffers()))
    return out, skipped, x, dy


def check_outputs(cases: dict, keys: list, x: Tensor, dy: Tensor, device: torch.device,
                   dtype: torch.dtype) -> dict[str, str]:
    """{method: output_check(...)} for the TailLoR methods, against the eager TailLoRLinear on the same inputs."""
    checked = [k for k in keys if k in CHECKED_METHODS]
    source = next((cases[k] for k in ("taillor-eager", *ROUTE_METHODS) if k in cases), None)
    if not checked or source is None:
        return {}
    reference = dataclasses_replace(source, backend="eager").outputs(x, dy, device)
    return {key: output_check(cases[key].outputs(x, dy, device), reference, dtype) for key in checked}
