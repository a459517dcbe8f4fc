"""Shared test helpers: the one tolerance table, the one oracle comparison, the dense float64 oracles, and the
kernel implementations available on this machine (each op-stem test file is parametrized over them)."""
from __future__ import annotations

import importlib
import importlib.util
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch


runpy.run_path(str(Path(__file__).with_name("pypi_kernels.py")))["import_pypi_kernels"]()

# Property tests draw the same examples on every run (a CI failure reproduces locally; no example database needed).
if importlib.util.find_spec("hypothesis") is not None:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("taillor", derandomize=True, database=None, deadline=None)
    _hypothesis_settings.load_profile("taillor")

# ---------------------------------------------------------------------------------------------------------------
# The tolerance table: every bound a test compares with lives here, by what is compared.
# ---------------------------------------------------------------------------------------------------------------
TOLERANCE = {
    # Against the dense float64 oracle, as the normalized error max|actual − oracle| / max|oracle|, per dtype, for
    # one layer of the sizes used in tests (d <= 256): a few ulps of accumulation error in the compute dtype.
    "oracle": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
    # A fast path (Triton, CUDA) against the same oracle, flash-attention style: its normalized error may be at
    # most twice the eager path's error in the same dtype plus this floor.
    "floor": {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3},
    # The frame accuracy contract of head frames and randomized_svd: top-k singular values within this relative
    # error of the exact SVD, singular subspaces within this largest principal angle (radians).
    "sigma": 1e-3,
    "angle": 1e-2,
    # The CUDA extension's singular values of an exactly flat spectrum: exact in float32 (the sketch spans a subspace
    # of the range), nearly flat after a bf16 cast, where a rank-2k sketch is only approximately right.
    "flat spectrum": {torch.float32: 1e-3, torch.bfloat16: 1e-2},
    # Randomized SVD of a matrix whose rank fits in the sketch (the algorithm is then exact): what is left is the
    # input dtype's rounding, as the relative error of the singular values.
    "exact sketch": {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-10},
    # A float32 matrix of exact rank r below the sketch: its singular values past r, relative to the largest, and
    # the rank-k reconstruction's error, relative to ‖A‖ (zero in exact arithmetic).
    "rank deficient": 1e-5,
    # Two float32 computations of one value (no oracle involved). A number is a bound on the normalized difference
    # max|a − b| / max|b|; a pair is elementwise (atol, rtol) as in torch.testing.assert_close:
    # the same layer step on another backend with the same dropout mask (normalized);
    "other backend": 1e-5,
    # the same model or layer output with its sums in another order (merge, consolidate, compile, another
    # backend, a batch against one by one);
    "reordered": (1e-5, 1e-5),
    # a product of factors that were each computed in another order (U·S·Vᵀ of a batched against a single SVD,
    # a singular value of a rank-deficient matrix against its exact value);
    "reordered product": (1e-4, 1e-4),
    # a base weight after merge then unmerge, or after consolidations are subtracted again;
    "weight round trip": (1e-6, 0.0),
    # outputs after save / load or export: A and B re-expressed in a recomputed frame, folds replayed;
    "reloaded": (1e-4, 0.0),
    # the trainable factors or frames after a reload or a trip through other processes;
    "reloaded factors": (1e-5, 0.0),
    # frames computed on another rank, against one process's;
    "other rank": (1e-5, 1e-5),
    # one optimizer step through the Trainer against the same step by hand;
    "optimizer step": (1e-6, 1e-5),
    # QᵀQ against the identity for a float32 orthonormal basis: well conditioned on the CPU, or loose for a
    # rank-deficient input and for CUDA (the extension's float32 CholeskyQR, cuSOLVER);
    "orthonormal": (1e-5, 0.0),
    "orthonormal, loose": (1e-4, 0.0),
    # one matrix of a mixed batch against its exact singular values, both divided by max(1, largest value);
    "batch member": (1e-6, 1e-3),
    # One float32 scalar against its float64 oracle (or the same value computed another way), as
    # |actual − oracle| / |oracle|: a penalty (one rounded reduction), an adapted strength (a log, an exp and a clamp),
    # a perplexity or a norm ratio: tighter than a layer's elementwise "oracle" bound, nothing accumulates across a
    # product.
    "scalar": 1e-5,
    # A head share (in [0, 1]) against its oracle, or against the same share from the weights: absolute, since the
    # share of an update orthogonal to the head is 0 up to rounding.
    "share": 1e-5,
    # A float32 product with entries of order one that is zero in exact arithmetic (A·V_h after the tail init):
    # absolute, a few ulps.
    "exact zero": (1e-6, 0.0),
}


def normalized_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """max|actual − oracle| / max|oracle|, in float64 (0 for empty tensors)."""
    actual, oracle = actual.detach().cpu().double(), oracle.detach().cpu().double()
    if oracle.numel() == 0:
        return 0.0
    scale = oracle.abs().max().clamp_min(1e-30)
    return float((actual - oracle).abs().max() / scale)


def assert_matches_oracle(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, what: str = "",
                          eager: Optional[torch.Tensor] = None) -> None:
    """The one oracle comparison: ``actual`` against the float64 ``oracle`` as a normalized error.

    Without ``eager`` the bound is TOLERANCE["oracle"][dtype]. With ``eager`` (the same value computed by the eager
    PyTorch path in ``dtype``) ``actual`` is a fast path and may err twice as much as eager, plus the floor:
    error <= 2 · eager error + TOLERANCE["floor"][dtype].
    """
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = normalized_error(actual, oracle)
    if eager is None:
        bound, detail = TOLERANCE["oracle"][dtype], ""
    else:
        err_eager = normalized_error(eager, oracle)
        bound, detail = 2 * err_eager + TOLERANCE["floor"][dtype], f", eager {err_eager:.3e}"
    assert err <= bound, f"{what} ({dtype}): normalized error {err:.3e} > bound {bound:.3e}{detail}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str = "") -> None:
    """Two computations of one value within TOLERANCE[kind]: a normalized difference (a number) or elementwise
    (atol, rtol) (a pair)."""
    bound = TOLERANCE[kind]
    label = f"{what}: {kind}" if what else kind
    if isinstance(bound, tuple):
        torch.testing.assert_close(actual, expected, atol=bound[0], rtol=bound[1], msg=label)
        return
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = normalized_error(actual, expected)
    assert diff <= bound, f"{label}: normalized difference {diff:.3e} > {bound:.1e}"


def assert_scalar_matches(actual, oracle: float, what: str = "", kind: str = "scalar") -> None:
    """A scalar (a float or a one-element tensor) against ``oracle`` within TOLERANCE[kind]: "scalar" relative
    (absolute when the oracle is 0), "share" absolute."""
    value = float(actual.detach().reshape(())) if isinstance(actual, torch.Tensor) else float(actual)
    scale = abs(oracle) if kind != "share" and oracle != 0 else 1.0
    err = abs(value - oracle) / scale
    assert err <= TOLERANCE[kind], f"{what}: {value!r} against {oracle!r}, {kind} error {err:.3e} > {TOLERANCE[kind]}"


# ---------------------------------------------------------------------------------------------------------------
# dense float64 oracles
# ---------------------------------------------------------------------------------------------------------------
def dense_delta(layer) -> torch.Tensor:
    """Oracle ΔW in float64 from the layer's own frame and parameters."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    s = layer.scaling
    if layer.config.frame == "full":
        return s * layer.frame.U.double() @ B @ A @ layer.frame.V.double().t()
    return s * B @ A


def dense_layer_oracle(layer, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Oracle (y, dx, dA, dB) in float64 of y = x (W + ΔW)ᵀ + b with upstream gradient dy, for a dense base weight
    W (d_out, d_in) (a quantized base's dequantized weight, say) and ΔW from the layer's own frame, A and B."""
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    U, V = layer.frame.U.double(), layer.frame.V.double()
    delta = layer.scaling * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)
    x64 = x.detach().double().requires_grad_(True)
    y64 = x64 @ (weight.double() + delta).t()
    if bias is not None:
        y64 = y64 + bias.double()
    y64.backward(dy.double())
    return y64.detach(), x64.grad, A.grad, B.grad


def dense_penalty(layer, A=None, B=None, strength=None) -> torch.Tensor:
    """Oracle penalty λ(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) with ΔW materialized in float64 (differentiable in A, B);
    λ = ``strength``, default ``layer.config.penalty``."""
    A = layer.lora_A.detach().double() if A is None else A
    B = layer.lora_B.detach().double() if B is None else B
    U, V = layer.frame.U.double(), layer.frame.V.double()
    s = layer.scaling
    delta = s * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)
    omega = layer.frame.omega2.double().sqrt()
    omega_U, omega_V = U * omega, V * omega
    strength = layer.config.penalty if strength is None else strength
    return strength * ((omega_U.t() @ delta).pow(2).sum() + (delta @ omega_V).pow(2).sum())


def assert_penalty_matches_oracle(layer, value: torch.Tensor, oracle, what: str = "penalty") -> None:
    """``value``, a float32 penalty of ``layer`` already backpropagated into ``lora_A.grad``/``lora_B.grad``, and those
    gradients against ``oracle(A, B)``: a float64 formula differentiable in the layer's A and B."""
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    expected = oracle(A, B)
    expected.backward()
    assert_matches_oracle(value.detach(), expected.detach(), torch.float32, what)
    assert_matches_oracle(layer.lora_A.grad, A.grad, torch.float32, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, torch.float32, "dB")


def dense_head_share(layer) -> float:
    """Oracle share (‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) / (2‖ΔW‖²) with ΔW materialized in float64."""
    delta = dense_delta(layer)
    omega = layer.frame.omega2.double().sqrt()
    U, V = layer.frame.U.double() * omega, layer.frame.V.double() * omega
    weighted = (U.t() @ delta).pow(2).sum() + (delta @ V).pow(2).sum()
    return float(weighted / (2 * delta.pow(2).sum()))


# ---------------------------------------------------------------------------------------------------------------
# kernel implementations available on this machine
# ---------------------------------------------------------------------------------------------------------------
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of an op's launchers: ``eager`` (PyTorch, CPU), ``interpreter`` (Triton kernels in the
    Triton interpreter, CPU) or ``compiled`` (Triton kernels on a CUDA device); ``route`` picks the adapter's
    Triton route ("fused" | "split")."""
    backend: str
    route: Optional[str] = None

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "compiled" else "cpu"

    @property
    def id(self) -> str:
        return self.backend + (f"-{self.route}" if self.route else "")

    def launchers(self, stem: str):
        """(forward, backward) of op ``stem`` ("tail_adapter", "spectral_projection", "spectral_penalty")."""
        if self.backend == "eager":
            module = importlib.import_module(f"taillor.eager.{stem}")
            return getattr(module, f"{stem}_forward"), getattr(module, f"{stem}_backward")
        kernels = importlib.import_module("taillor._kernels")
        name = stem if self.route in (None, "fused") else f"{stem}_{self.route}"
        return getattr(kernels, f"{name}_forward"), getattr(kernels, f"{name}_backward")


def kernel_impls(stem: str, backends=("eager", "interpreter", "compiled")) -> list:
    """pytest parameters for the ``impl`` fixture: every implementation of op ``stem`` among ``backends``.

    The compiled ones are marked ``gpu`` and skip without CUDA (``pytest -m gpu`` collects them anywhere); the
    Triton ones skip when Triton does not import."""
    routes = ("fused", "split") if stem == "tail_adapter" else (None,)
    params = []
    for backend in backends:
        marks = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")] \
            if backend == "compiled" else []
        for route in (None,) if backend == "eager" else routes:
            impl = KernelImpl(backend, route)
            params.append(pytest.param(impl, id=impl.id, marks=marks))
    return params


@pytest.fixture
def impl(request, monkeypatch) -> KernelImpl:
    """The implementation a test runs (indirect parametrization with :func:`kernel_impls`), switched on for this
    test only: taillor reads TRITON_INTERPRET at every launch, so nothing collected or imported before the test is
    affected. Compiled kernels run untuned (TAILLOR_AUTOTUNE=0: the first config), so the tests spend their time
    checking, not benchmarking configs."""
    chosen = request.param
    if chosen.backend != "eager":
        pytest.importorskip("triton", reason="triton is not installed (the Triton kernels need it)")
    if chosen.backend == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif chosen.backend == "compiled":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setenv("TAILLOR_AUTOTUNE", "0")
    return chosen


@pytest.fixture
def interpreter(monkeypatch):
    """Run Triton kernels in the Triton interpreter for this test only (CPU tensors allowed)."""
    pytest.importorskip("triton", reason="triton is not installed (the Triton kernels need it)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_layer_device(request) -> str:
    """The device of the layer-level Triton tests: compiled kernels on CUDA when there is a GPU, else the Triton
    interpreter on the CPU (switched on for this test only)."""
    pytest.importorskip("triton", reason="triton is not installed (the Triton kernels need it)")
    if CUDA:
        return "cuda"
    request.getfixturevalue("interpreter")
    return "cpu"
