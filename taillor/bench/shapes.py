"""What the benchmarks measure: every shape and case of ``taillor bench`` and of the pytest-benchmark suites in
``benchmarks/`` (one registry; ``benchmarks/registry.py`` turns it into pytest parameters), the speed-target
shapes, the round counts, and the environment switches (``TAILLOR_BENCH_FAST`` / ``_QUICK`` / ``_FULL``, parsed
by :func:`env_flag`, and ``TAILLOR_BENCH_ROUNDS``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


def env_flag(name: str) -> bool:
    """An on/off environment variable: off when unset or one of "", "0", "false", "no", "off" (any case)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def fast_mode() -> bool:
    """``TAILLOR_BENCH_FAST=1``: toy shapes, one round (CI; the numbers mean nothing)."""
    return env_flag("TAILLOR_BENCH_FAST")


def quick_mode() -> bool:
    """``TAILLOR_BENCH_QUICK=1``: the speed-target cases only, fewer rounds on CUDA (gpu_check.sh fits its budget
    with it)."""
    return env_flag("TAILLOR_BENCH_QUICK")


def full_mode() -> bool:
    """``TAILLOR_BENCH_FULL=1``: the frames suite on all 16 layers of the 1B shapes on the CPU (slow)."""
    return env_flag("TAILLOR_BENCH_FULL")


@dataclass(frozen=True)
class AdapterShape:
    """One adapter benchmark: T tokens through a d_in -> d_out layer (weight d_out×d_in), adapter rank r, the
    TailLoR layers in ``frame`` ("head", the library's default, or "full": P and Q projected through U and V)."""
    tokens: int
    d_in: int
    d_out: int
    rank: int
    dtype: str = "float32"
    note: str = ""
    frame: str = "head"

    @property
    def name(self) -> str:
        return f"T={self.tokens} {self.d_in}->{self.d_out} r={self.rank} {_DTYPE_SHORT[self.dtype]} {self.frame}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}

# The speed targets, each timed in both frames (the head frame is the library's default; the full frame adds the
# projection of the factors through U and V). CPU: d = 1024, 2048 tokens, r = 16, fp32 (eager <= CPU_SPEED_LIMIT x
# the floor, faster than PEFT). GPU: bf16, 8192 tokens, 4096x4096, r = 16 (every Triton route <= GPU_SPEED_LIMIT x
# the floor, faster than PEFT).
CPU_SPEED_TARGET = AdapterShape(2048, 1024, 1024, 16, "float32", "CPU speed target")
GPU_SPEED_TARGET = AdapterShape(8192, 4096, 4096, 16, "bfloat16", "GPU speed target")
CPU_SPEED_LIMIT = 1.30
GPU_SPEED_LIMIT = 1.07
FRAMES = ("head", "full")


def in_both_frames(shape: AdapterShape) -> list[AdapterShape]:
    """``shape`` in the head frame, then in the full frame."""
    return [replace(shape, frame=frame) for frame in FRAMES]


def speed_targets(device: str) -> list[AdapterShape]:
    """The speed-target shape of ``device`` ("cpu" | "cuda") in both frames."""
    return in_both_frames(GPU_SPEED_TARGET if device == "cuda" else CPU_SPEED_TARGET)


def adapter_shapes(device: str, quick: bool = False) -> list[AdapterShape]:
    """The adapter shapes for ``device`` ("cpu" | "cuda"): every shape in the head frame, the speed target in both
    frames; ``quick`` keeps the speed targets (and one smaller step on CUDA)."""
    if fast_mode():
        return in_both_frames(AdapterShape(64, 48, 40, 4, "float32", "fast"))
    if device == "cpu":
        if quick:
            return speed_targets(device)
        return [AdapterShape(256, 384, 384, 8, note="MiniLM width"), AdapterShape(512, 512, 512, 8),
                *speed_targets(device), AdapterShape(2048, 1024, 1024, 64), AdapterShape(1024, 1024, 2816, 16),
                AdapterShape(1024, 2816, 1024, 16)]
    if quick:
        return [*speed_targets(device), AdapterShape(2048, 4096, 4096, 16, "bfloat16")]
    shapes = []
    for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for tokens in (2048, 8192):
            for rank in (8, 16, 64):
                shape = AdapterShape(tokens, d_in, d_out, rank, "bfloat16")
                is_target = shape == replace(GPU_SPEED_TARGET, note="")
                shapes += speed_targets(device) if is_target else [shape]
    return shapes


@dataclass(frozen=True)
class SvdCase:
    """Top-k SVD of an m×n matrix with singular values σ_i = (1 + i)^-decay (random singular vectors)."""
    m: int
    n: int
    k: int
    oversample: int
    niter: int
    decay: float = 1.0
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.m}x{self.n} k={self.k} p={self.oversample} q={self.niter} σ~i^-{self.decay:g}"


# The randomized-SVD target: no slower than svd_lowrank with the same sketch, no less accurate, >= 10x linalg.svd.
SVD_SPEED_TARGET = SvdCase(1024, 1024, 64, 10, 2, 1.0, "speed target")


def svd_cases(device: str, quick: bool = False) -> list[SvdCase]:
    if fast_mode():
        return [SvdCase(96, 80, 8, 4, 2, 1.0, "fast")]
    if quick:
        return [SVD_SPEED_TARGET]
    cases = [SVD_SPEED_TARGET, SvdCase(1024, 1024, 64, 10, 2, 0.5, "slow decay")]
    if device == "cuda":
        cases.append(SvdCase(4096, 4096, 256, 512, 5, 0.5, "frame settings, 7B q_proj"))
    return cases


@dataclass(frozen=True)
class PenaltyCase:
    """The spectral penalty of one layer: full frame (k = d) or head frame (h of d), adapter rank r."""
    d: int
    rank: int
    frame: str = "full"
    head: int = 0
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.frame} d={self.d} r={self.rank}" + (f" h={self.head}" if self.frame == "head" else "")


# The penalty target: the Gram form >= 10x faster than materializing ΔW (forward + backward).
PENALTY_SPEED_TARGET = PenaltyCase(1024, 16, "full", 0, "speed target")


def penalty_cases(device: str, quick: bool = False) -> list[PenaltyCase]:
    if fast_mode():
        return [PenaltyCase(48, 4, "full", 0, "fast"), PenaltyCase(48, 4, "head", 8, "fast")]
    if quick:
        return [PENALTY_SPEED_TARGET]
    return [PENALTY_SPEED_TARGET, PenaltyCase(2048, 16, "full"), PenaltyCase(2048, 16, "head", 256)]


@dataclass(frozen=True)
class FramesModel:
    """Target layers of a Llama-shaped model: per layer q, o (d×d), k, v (kv×d), gate, up (mlp×d), down (d×mlp)."""
    name: str
    layers: int
    d: int
    mlp: int
    kv: int
    head: int

    def shapes(self) -> dict[str, tuple[int, int]]:
        """{module name: (d_out, d_in)} for every target weight."""
        per_layer = {"q_proj": (self.d, self.d), "k_proj": (self.kv, self.d), "v_proj": (self.kv, self.d),
                     "o_proj": (self.d, self.d), "gate_proj": (self.mlp, self.d), "up_proj": (self.mlp, self.d),
                     "down_proj": (self.d, self.mlp)}
        return {f"layers.{i}.{name}": shape for i in range(self.layers) for name, shape in per_layer.items()}


# Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, grouped-query attention with 8 KV heads of 64 (k/v 512×2048).
LLAMA_1B = FramesModel("llama-1b", 16, 2048, 8192, 512, 256)
# Llama-2-7B: 32 layers, hidden 4096, MLP 11008, multi-head attention (k/v 4096×4096): 224 matrices.
LLAMA_7B = FramesModel("llama-7b", 32, 4096, 11008, 4096, 256)


def frames_models(device: str, quick: bool = False, full: bool = False) -> list[FramesModel]:
    """CPU: one layer of the 1B shapes (all 16 with ``full``); CUDA: the 7B model (2 layers with ``quick``)."""
    if fast_mode():
        return [FramesModel("tiny", 2, 128, 384, 64, 16)]
    if device == "cuda":
        return [LLAMA_7B if not quick else FramesModel("llama-7b-2layers", 2, 4096, 11008, 4096, 256)]
    if full:
        return [LLAMA_1B]
    return [FramesModel("llama-1b-1layer", 1, 2048, 8192, 512, 256)]


def rounds_for(device: str, quick: bool) -> tuple[int, int]:
    """(warmup, rounds) of the interleaved measurements; ``TAILLOR_BENCH_ROUNDS`` overrides rounds."""
    if fast_mode():
        return 0, 1
    # On the CPU a ratio as close to 1 as TailLoR / PEFT needs a few dozen paired rounds on a shared machine.
    warmup, rounds = (3, 25)
    if device == "cuda":
        warmup, rounds = (5, 20) if quick else (5, 30)
    env = os.environ.get("TAILLOR_BENCH_ROUNDS")
    return warmup, int(env) if env else rounds



@dataclass(frozen=True)
class ProjectionCase:
    """The full-frame projection of one layer: P = V Aᵀ (d_in, r), Q = U B (d_out, r) with k = min(d_in, d_out),
    frame and factors in float32, P and Q in ``out_dtype`` (the layer's activation dtype)."""
    d_in: int
    d_out: int
    rank: int
    out_dtype: str = "float32"
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.d_in}->{self.d_out} r={self.rank} -> {_DTYPE_SHORT[self.out_dtype]}"


def projection_cases(device: str, quick: bool = False) -> list[ProjectionCase]:
    """CPU: the CPU speed-target layer and two others; CUDA: 7B-shaped layers with bf16 outputs."""
    if fast_mode():
        return [ProjectionCase(48, 40, 4, "float32", "fast")]
    if device == "cuda":
        cases = [ProjectionCase(4096, 4096, 16, "bfloat16"), ProjectionCase(4096, 11008, 16, "bfloat16")]
    else:
        cases = [ProjectionCase(1024, 1024, 16), ProjectionCase(384, 384, 8), ProjectionCase(1024, 2816, 16)]
    return cases[:1] if quick else cases
