"""Direct tests of the Triton launchers (kernels/), run on the CPU by the Triton interpreter.

Every output is compared with a dense float64 oracle. Tolerance rule (flash-attention style, DESIGN §7):
the kernel's max error against the oracle must be at most twice the error of the same computation done
eagerly in PyTorch in the input dtype, plus a floor relative to the output's scale (fp32 1e-5, fp16 1e-3,
bf16 1e-2). The ahead-of-time compile check (`taillor check-kernels`) runs in a subprocess without the
interpreter.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede any import of triton or of the kernels

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


def _load_kernels():
    """A private copy of the kernels package, imported here with TRITON_INTERPRET=1 whatever other test
    modules imported before (taillor._kernels may already be loaded in compiled mode)."""
    name = "_taillor_kernels_interpreted"
    spec = importlib.util.spec_from_file_location(name, _KERNELS_DIR / "__init__.py",
                                                  submodule_search_locations=[str(_KERNELS_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


K = _load_kernels()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def assert_close(name, out, eager, oracle, dtype):
    """|out - oracle| <= 2 |eager - oracle| + floor · scale (max norms)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    oracle = oracle.double()
    err = (out.double() - oracle).abs().max().item() if out.numel() else 0.0
    err_eager = (eager.double() - oracle).abs().max().item() if out.numel() else 0.0
    scale = oracle.abs().max().item() if out.numel() else 0.0
    bound = 2 * err_eager + FLOOR[dtype] * max(scale, 1e-30)
    assert err <= bound, f"{name} ({dtype}): error {err:.3e} > bound {bound:.3e} (eager {err_eager:.3e})"


def _d(t):
    return None if t is None else t.double()


# ---------------------------------------------------------------------------------------------------------
# tail adapter

# (T, d_in, d_out, r): odd sizes, rank 1, d_in < 2r, and r above one rank block (64).
ADAPTER_SHAPES = [(37, 96, 80, 4), (5, 40, 24, 1), (19, 6, 10, 4), (9, 20, 18, 70)]


def _adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = rnd(T, d_in)
    W = rnd(d_out, d_in, std=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    P = rnd(d_in, r, std=d_in ** -0.5)
    Q = rnd(d_out, r, std=0.5)
    xa = rnd(T, d_in) if adapter else None
    return x, W, b, P, Q, xa


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,adapter", [(True, False), (False, True), (True, True)],
                         ids=["bias", "x_adapter", "bias+x_adapter"])
def test_tail_adapter(dtype, shape, bias, adapter):
    T, d_in, d_out, r = shape
    s = 0.75
    x, W, b, P, Q, xa = _adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter)
    xa_ = x if xa is None else xa

    # forward
    y, S = K.tail_adapter_forward(x, W, b, P, Q, s, x_adapter=xa)
    assert y.dtype == dtype and S.dtype == dtype
    S64 = _d(xa_) @ _d(P)
    y64 = _d(x) @ _d(W).T + s * S64 @ _d(Q).T + (0 if b is None else _d(b))
    S_e = xa_ @ P
    y_e = x @ W.T + s * (S_e @ Q.T) + (0 if b is None else b)
    assert_close("S", S, S_e, S64, dtype)
    assert_close("y", y, y_e, y64, dtype)

    # backward (from the kernel's own S, as autograd would)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(T, d_out, generator=gen, dtype=torch.float64).to(dtype)
    dx, dP, dQ, dxa = K.tail_adapter_backward(dy, x, W, S, P, Q, s, x_adapter=xa)
    G64 = _d(dy) @ _d(Q)
    G_e = dy @ Q
    assert_close("dQ", dQ, s * (dy.T @ S), s * _d(dy).T @ _d(S), dtype)
    assert_close("dP", dP, s * (xa_.T @ G_e), s * _d(xa_).T @ G64, dtype)
    assert dP.dtype == P.dtype and dQ.dtype == Q.dtype and dx.dtype == dtype
    if xa is None:
        assert dxa is None
        assert_close("dx", dx, dy @ W + s * (G_e @ P.T), _d(dy) @ _d(W) + s * G64 @ _d(P).T, dtype)
    else:
        assert_close("dx", dx, dy @ W, _d(dy) @ _d(W), dtype)
        assert_close("dx_adapter", dxa, s * (G_e @ P.T), s * G64 @ _d(P).T, dtype)


@pytest.mark.parametrize("adapter", [False, True])
def test_tail_adapter_backward_needs(adapter):
    x, W, b, P, Q, xa = _adapter_inputs(11, 24, 20, 3, torch.float32, False, adapter)
    y, S = K.tail_adapter_forward(x, W, None, P, Q, 0.5, x_adapter=xa)
    dy = torch.randn(11, 20)
    full = K.tail_adapter_backward(dy, x, W, S, P, Q, 0.5, x_adapter=xa)
    for need in ("need_dx", "need_dP", "need_dQ"):
        out = K.tail_adapter_backward(dy, x, W, S, P, Q, 0.5, x_adapter=xa, **{need: False})
        skipped = {"need_dx": (0, 3), "need_dP": (1,), "need_dQ": (2,)}[need]
        for i, (got, ref) in enumerate(zip(out, full, strict=True)):
            if i in skipped or ref is None:
                assert got is None
            else:
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert K.tail_adapter_backward(dy, x, W, S, P, Q, 0.5, x_adapter=xa, need_dx=False, need_dP=False,
                                   need_dQ=False) == (None, None, None, None)


def test_tail_adapter_zero_tokens():
    x, W, b, P, Q, _ = _adapter_inputs(0, 16, 12, 2, torch.float32, True, False)
    y, S = K.tail_adapter_forward(x, W, b, P, Q, 2.0)
    assert y.shape == (0, 12) and S.shape == (0, 2)
    dx, dP, dQ, dxa = K.tail_adapter_backward(torch.zeros(0, 12), x, W, S, P, Q, 2.0)
    assert dx.shape == (0, 16) and dxa is None
    assert torch.equal(dP, torch.zeros(16, 2)) and torch.equal(dQ, torch.zeros(12, 2))


def test_tail_adapter_strided_factors():
    # P and Q may be strided views (head mode passes P = A.t()); x must be row-major.
    x, W, b, _, _, _ = _adapter_inputs(13, 24, 20, 3, torch.float32, True, False)
    A = torch.randn(3, 24) / 5
    Bt = torch.randn(3, 20)
    y, S = K.tail_adapter_forward(x, W, b, A.t(), Bt.t(), 1.5)
    ref = _d(x) @ _d(W).T + _d(b) + 1.5 * (_d(x) @ _d(A).T) @ _d(Bt)
    assert_close("y", y, x @ W.T + b + 1.5 * (x @ A.t()) @ Bt, ref, torch.float32)


def test_tail_adapter_rejects_bad_inputs():
    x, W, b, P, Q, _ = _adapter_inputs(7, 16, 12, 2, torch.float32, True, False)
    s = 1.0
    with pytest.raises(ValueError, match="weight"):
        K.tail_adapter_forward(x, W[:, :15], b, P, Q, s)
    with pytest.raises(ValueError, match="Q"):
        K.tail_adapter_forward(x, W, b, P, Q[:, :1], s)
    with pytest.raises(ValueError, match="P has dtype"):
        K.tail_adapter_forward(x, W, b, P.double(), Q, s)
    with pytest.raises(ValueError, match="bias"):
        K.tail_adapter_forward(x, W, b[:5], P, Q, s)
    with pytest.raises(ValueError, match="x must be contiguous"):
        K.tail_adapter_forward(torch.randn(16, 7).t(), W, b, P, Q, s)
    with pytest.raises(ValueError, match="x_adapter"):
        K.tail_adapter_forward(x, W, b, P, Q, s, x_adapter=x[:3])
    with pytest.raises(ValueError, match="x must be 2-D"):
        K.tail_adapter_forward(x[None], W, b, P, Q, s)
    with pytest.raises(ValueError, match="x has dtype"):
        K.tail_adapter_forward(x.to(torch.int32), W.to(torch.int32), None, P, Q, s)
    y, S = K.tail_adapter_forward(x, W, b, P, Q, s)
    with pytest.raises(ValueError, match="dy"):
        K.tail_adapter_backward(torch.randn(7, 13), x, W, S, P, Q, s)
    with pytest.raises(ValueError, match="S has"):
        K.tail_adapter_backward(torch.randn(7, 12), x, W, S.half(), P, Q, s)


# ---------------------------------------------------------------------------------------------------------
# spectral projection

# (k, d_in, d_out, r)
PROJECTION_SHAPES = [(50, 96, 80, 4), (7, 9, 12, 1), (24, 30, 20, 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spectral_projection(dtype, shape):
    k, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(2)
    U, V, A, B, dP, dQ = (torch.randn(*sh, generator=g, dtype=torch.float64).to(dtype)
                          for sh in ((d_out, k), (d_in, k), (r, k), (k, r), (d_in, r), (d_out, r)))
    P, Q = K.spectral_projection_forward(A, B, U, V)
    assert_close("P", P, V @ A.T, _d(V) @ _d(A).T, dtype)
    assert_close("Q", Q, U @ B, _d(U) @ _d(B), dtype)
    dA, dB = K.spectral_projection_backward(dP, dQ, U, V)
    assert dA.is_contiguous() and dB.is_contiguous() and dA.dtype == dtype
    assert_close("dA", dA, dP.T @ V, _d(dP).T @ _d(V), dtype)
    assert_close("dB", dB, U.T @ dQ, _d(U).T @ _d(dQ), dtype)


def test_spectral_projection_backward_one_side():
    U, V, dP, dQ = torch.randn(8, 5), torch.randn(6, 5), torch.randn(6, 2), torch.randn(8, 2)
    dA, dB = K.spectral_projection_backward(dP, dQ, U, V)
    dA_only, none_b = K.spectral_projection_backward(dP, None, U, V)
    none_a, dB_only = K.spectral_projection_backward(None, dQ, U, V)
    assert none_a is None and none_b is None
    assert torch.equal(dA_only, dA) and torch.equal(dB_only, dB)


def test_spectral_projection_rejects_bad_inputs():
    U, V, A, B = torch.randn(8, 5), torch.randn(6, 5), torch.randn(2, 5), torch.randn(5, 2)
    with pytest.raises(ValueError, match="V"):
        K.spectral_projection_forward(A, B, U, V[:, :4])
    with pytest.raises(ValueError, match="B has shape"):
        K.spectral_projection_forward(A, B[:, :1], U, V)
    with pytest.raises(ValueError, match="A has dtype"):
        K.spectral_projection_forward(A.half(), B, U, V)
    with pytest.raises(ValueError, match="dQ"):
        K.spectral_projection_backward(torch.randn(6, 2), torch.randn(7, 2), U, V)


# ---------------------------------------------------------------------------------------------------------
# spectral penalty


def _penalty_eager(A, B, U, V, w, c):
    """The penalty in Gram form, computed by PyTorch in the inputs' dtype (float64 inputs: the oracle)."""
    w = w.to(A.dtype)
    if U is None:
        Bh, Ah = B, A
    else:
        Bh, Ah = U.T @ B, A @ V
    return c * ((Bh.T @ (w[:, None] * Bh)) * (A @ A.T)).sum() + c * ((B.T @ B) * ((Ah * w) @ Ah.T)).sum()


def _penalty_grads_eager(A, B, U, V, w, c, g):
    """Closed-form gradients (module docstring of kernels/spectral_penalty.py), in the inputs' dtype."""
    w = w.to(A.dtype)
    if U is None:
        dA = (B.T @ (w[:, None] * B)) @ A + ((B.T @ B) @ A) * w
        dB = w[:, None] * (B @ (A @ A.T)) + B @ ((A * w) @ A.T)
    else:
        Bh, Ah = U.T @ B, A @ V
        dA = (Bh.T @ (w[:, None] * Bh)) @ A + (((B.T @ B) @ Ah) * w) @ V.T
        dB = U @ (w[:, None] * Bh @ (A @ A.T)) + B @ ((Ah * w) @ Ah.T)
    return 2 * c * g * dA, 2 * c * g * dB


def _penalty_inputs(mode, r, dtype, seed=3):
    k, d_in, d_out, h = 50, 96, 70, 12
    g = torch.Generator().manual_seed(seed)
    if mode == "full":
        A = torch.randn(r, k, generator=g, dtype=torch.float64)
        B = torch.randn(k, r, generator=g, dtype=torch.float64)
        U = V = None
        w = torch.rand(k, generator=g, dtype=torch.float64)
        w[k // 2:] = 0  # "head" weighting: zeros on the tail
    else:
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(d_out, h, generator=g, dtype=torch.float64))[0].to(dtype)
        V = torch.linalg.qr(torch.randn(d_in, h, generator=g, dtype=torch.float64))[0].to(dtype)
        w = torch.rand(h, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype), U, V, w.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("r", [1, 5, 40])
def test_spectral_penalty(dtype, mode, r):
    A, B, U, V, w = _penalty_inputs(mode, r, dtype)
    c, g = 0.3, 1.7
    val = K.spectral_penalty_forward(A, B, U, V, w, c)
    assert val.shape == () and val.dtype == torch.float32
    oracle = _penalty_eager(_d(A), _d(B), _d(U), _d(V), w.double(), c)
    assert_close("value", val, _penalty_eager(A, B, U, V, w, c), oracle, dtype)

    dA, dB = K.spectral_penalty_backward(torch.tensor(g), A, B, U, V, w, c)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dtype and dB.dtype == dtype
    dA64, dB64 = _penalty_grads_eager(_d(A), _d(B), _d(U), _d(V), w.double(), c, g)
    dA_e, dB_e = _penalty_grads_eager(A, B, U, V, w, c, g)
    assert_close("dA", dA, dA_e, dA64, dtype)
    assert_close("dB", dB, dB_e, dB64, dtype)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_spectral_penalty_gradients_match_autograd(mode):
    # The closed forms used as oracle above agree with autograd on the float64 Gram-form value.
    A, B, U, V, w = _penalty_inputs(mode, 3, torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    _penalty_eager(A, B, U, V, w.double(), 0.3).backward(torch.tensor(1.7, dtype=torch.float64))
    dA, dB = _penalty_grads_eager(A.detach(), B.detach(), U, V, w.double(), 0.3, 1.7)
    torch.testing.assert_close(A.grad, dA)
    torch.testing.assert_close(B.grad, dB)
    # ... and with the definition λ(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) (orthonormal frame, s folded into c).
    if mode == "full":
        k = A.shape[1]
        Uf = torch.linalg.qr(torch.randn(k + 3, k, dtype=torch.float64))[0]
        Vf = torch.linalg.qr(torch.randn(k + 5, k, dtype=torch.float64))[0]
        dW = Uf @ B @ A @ Vf.T
        om = w.double().sqrt()
        direct = 0.3 * ((om[:, None] * (Uf.T @ dW)).square().sum() + ((dW @ Vf) * om).square().sum())
    else:
        dW = B @ A
        om = w.double().sqrt()
        direct = 0.3 * ((om[:, None] * (U.T @ dW)).square().sum() + ((dW @ V) * om).square().sum())
    torch.testing.assert_close(_penalty_eager(A, B, U, V, w.double(), 0.3), direct)


def test_spectral_penalty_rejects_bad_inputs():
    A, B, U, V, w = _penalty_inputs("head", 2, torch.float32)
    with pytest.raises(ValueError, match="U and V"):
        K.spectral_penalty_forward(A, B, U, None, w, 1.0)
    with pytest.raises(ValueError, match="omega2 has length"):
        K.spectral_penalty_forward(A, B, U, V, w[:-1], 1.0)
    with pytest.raises(ValueError, match="V has shape"):
        K.spectral_penalty_forward(A, B, U, V[:-1], w, 1.0)
    with pytest.raises(ValueError, match="omega2 must be contiguous"):
        K.spectral_penalty_forward(A, B, U, V, torch.rand(2 * w.shape[0])[::2], 1.0)
    with pytest.raises(ValueError, match="grad"):
        K.spectral_penalty_backward(torch.ones(2), A, B, U, V, w, 1.0)
    Af, Bf, _, _, wf = _penalty_inputs("full", 2, torch.float32)
    with pytest.raises(ValueError, match="B has shape"):
        K.spectral_penalty_forward(Af, Bf[:-1], None, None, wf, 1.0)


# ---------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU, no interpreter)


def _kernel_names():
    names = set()
    for module in (K.tail_adapter, K.spectral_projection, K.spectral_penalty):
        names |= {n for n, obj in vars(module).items() if n.endswith("_kernel") and hasattr(obj, "fn")}
    return names


def test_aot_entries_cover_every_kernel_and_dtype():
    listed = {(e["name"], e["dtype"]) for e in K.AOT_KERNELS}
    names = _kernel_names()
    assert names == {"_tail_gemm_kernel", "_pair_kernel", "_penalty_gram_kernel"}
    assert listed == {(n, dt) for n in names for dt in ("fp32", "fp16", "bf16")}


@pytest.mark.slow
def test_check_kernels_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "taillor.check_kernels", "--arch", "sm_80,sm_90"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in _kernel_names():
        for dt in ("fp32", "fp16", "bf16"):
            for arch in ("sm_80", "sm_90"):
                assert any(ln.split()[:1] == [name] and f" {dt} " in ln and f" {arch} " in ln
                           and ln.rstrip().endswith("ok") for ln in lines), f"{name} {dt} {arch} missing"
