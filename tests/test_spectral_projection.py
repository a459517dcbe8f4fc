"""The spectral projection op, P = V Aᵀ and Q = U B (the full frame's layer factors), and its backward
dA = dPᵀ V, dB = Uᵀ dQ, against the dense float64 oracle.

Launcher level: every implementation on this machine (eager; Triton in the interpreter; compiled on a GPU, marked
``gpu``), in every dtype and in the layer's 16-bit activation dtype. Function level: gradcheck in float64 and the
activation-dtype output through taillor.spectral_projection.
"""
from __future__ import annotations

import pytest
import torch

import taillor
from taillor import functional as F
from conftest import CUDA, DTYPE_ID, DTYPES, assert_close, assert_matches_oracle, kernel_impls


def _d(t):
    return t.detach().cpu().double()


def is_empty(t):
    return t.dim() == 1 and t.numel() == 0


def check_spectral_projection(forward, backward, k, d_in, d_out, r, dtype, device="cpu", out_dtype=None):
    """P = V Aᵀ, Q = U B (in ``out_dtype``) and dA = dPᵀ V, dB = Uᵀ dQ against the float64 oracle, each allowed
    twice the error of plain PyTorch products plus the floor of the coarser of the two dtypes."""
    g = torch.Generator().manual_seed(2)
    U, V, A, B = (torch.randn(*sh, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                  for sh in ((d_out, k), (d_in, k), (r, k), (k, r)))
    grad_dtype = out_dtype or dtype
    dP, dQ = (torch.randn(*sh, generator=g, dtype=torch.float64).to(device=device, dtype=grad_dtype)
              for sh in ((d_in, r), (d_out, r)))
    P, Q = forward(A, B, U, V) if out_dtype is None else forward(A, B, U, V, out_dtype)
    tol_dtype = grad_dtype if grad_dtype.itemsize < dtype.itemsize else dtype  # the coarser of the two
    assert P.dtype == grad_dtype and Q.dtype == grad_dtype
    assert_matches_oracle(P, _d(V) @ _d(A).T, tol_dtype, "P", eager=(V @ A.T).to(grad_dtype))
    assert_matches_oracle(Q, _d(U) @ _d(B), tol_dtype, "Q", eager=(U @ B).to(grad_dtype))
    dA, dB = backward(dP, dQ, U, V)
    assert dA.is_contiguous() and dB.is_contiguous() and dA.dtype == dtype and dB.dtype == dtype
    assert_matches_oracle(dA, _d(dP).T @ _d(V), tol_dtype, "dA", eager=dP.to(dtype).T @ V)
    assert_matches_oracle(dB, _d(U).T @ _d(dQ), tol_dtype, "dB", eager=U.T @ dQ.to(dtype))


# (k, d_in, d_out, r)
PROJECTION_SHAPES = [(50, 96, 80, 4), (7, 9, 12, 1), (24, 30, 20, 70)]


@pytest.mark.parametrize("impl", kernel_impls("spectral_projection"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_launchers_match_float64_oracle(impl, dtype, shape):
    check_spectral_projection(*impl.launchers("spectral_projection"), *shape, dtype, impl.device)


@pytest.mark.parametrize("impl", kernel_impls("spectral_projection", ("compiled",)), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_compiled_launchers_on_a_layer_sized_frame(impl, dtype):
    check_spectral_projection(*impl.launchers("spectral_projection"), 1024, 1024, 768, 16, dtype, impl.device)


@pytest.mark.parametrize("impl", kernel_impls("spectral_projection"), indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
def test_launchers_write_the_activation_dtype(impl, out_dtype):
    """fp32 frame and factors, P and Q written in the layer's 16-bit activation dtype (tensor cores on a GPU)."""
    size = (1024, 1024, 768, 16) if impl.backend == "compiled" else (50, 96, 80, 4)
    check_spectral_projection(*impl.launchers("spectral_projection"), *size, torch.float32, impl.device,
                              out_dtype=out_dtype)


@pytest.mark.parametrize("impl", kernel_impls("spectral_projection", ("eager", "interpreter")), indirect=True)
def test_backward_of_one_side(impl):
    forward, backward = impl.launchers("spectral_projection")
    U, V, dP, dQ = torch.randn(8, 5), torch.randn(6, 5), torch.randn(6, 2), torch.randn(8, 2)
    dA, dB = backward(dP, dQ, U, V)
    dA_only, none_b = backward(dP, None, U, V)
    none_a, dB_only = backward(None, dQ, U, V)
    assert is_empty(none_a) and is_empty(none_b)
    assert torch.equal(dA_only, dA) and torch.equal(dB_only, dB)


@pytest.mark.parametrize("impl", kernel_impls("spectral_projection", ("interpreter",)), indirect=True)
def test_triton_launchers_reject_bad_inputs(impl):
    forward, backward = impl.launchers("spectral_projection")
    U, V, A, B = torch.randn(8, 5), torch.randn(6, 5), torch.randn(2, 5), torch.randn(5, 2)
    with pytest.raises(ValueError, match="V"):
        forward(A, B, U, V[:, :4])
    with pytest.raises(ValueError, match="B has shape"):
        forward(A, B[:, :1], U, V)
    with pytest.raises(ValueError, match="A has dtype"):
        forward(A.half(), B, U, V)
    with pytest.raises(ValueError, match="out_dtype"):
        forward(A, B, U, V, torch.float64)
    with pytest.raises(ValueError, match="dQ"):
        backward(torch.randn(6, 2), torch.randn(7, 2), U, V)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices (the device guard)")
@pytest.mark.parametrize("impl", kernel_impls("spectral_projection", ("compiled",)), indirect=True)
def test_launch_follows_the_tensors_device(impl):
    """The device guard: a launch on tensors of the second GPU works while the current device is the first."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        check_spectral_projection(*impl.launchers("spectral_projection"), 50, 96, 80, 4, torch.float32, device)


def test_gradcheck_float64():
    torch.manual_seed(0)
    d_in, d_out, r = 11, 7, 2
    k = min(d_in, d_out)
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    B = torch.randn(k, r, dtype=torch.float64, requires_grad=True)
    U = torch.linalg.qr(torch.randn(d_out, k, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, dtype=torch.float64)).Q
    assert torch.autograd.gradcheck(lambda A, B: F.spectral_projection(A, B, U, V), (A, B))


def test_activation_dtype_through_the_function_matches_float64_oracle():
    """P, Q written in bf16 straight from the fp32 frame; gradients reach fp32 A and B."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(3, 8, generator=g, requires_grad=True)
    B = torch.randn(8, 3, generator=g, requires_grad=True)
    U, V = torch.linalg.qr(torch.randn(10, 8, generator=g)).Q, torch.linalg.qr(torch.randn(12, 8, generator=g)).Q
    P, Q = taillor.spectral_projection(A, B, U, V, out_dtype=torch.bfloat16)
    assert P.dtype == Q.dtype == torch.bfloat16
    assert_matches_oracle(P, V.double() @ A.detach().double().t(), torch.bfloat16, "P")
    assert_matches_oracle(Q, U.double() @ B.detach().double(), torch.bfloat16, "Q")
    dP, dQ = torch.randn(12, 3, generator=g).bfloat16(), torch.randn(10, 3, generator=g).bfloat16()
    dA, dB = torch.autograd.grad((P, Q), (A, B), (dP, dQ))
    assert dA.dtype == dB.dtype == torch.float32
    assert_matches_oracle(dA, dP.double().t() @ V.double(), torch.bfloat16, "dA")
    assert_matches_oracle(dB, U.double().t() @ dQ.double(), torch.bfloat16, "dB")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_layer_reuses_its_factors_without_autograd_until_the_adapter_changes(frame, monkeypatch):
    """Evaluation and generation run without autograd: a layer projects its factors once and reuses them until
    A, B or the frame change; with autograd it projects on every call (the graph needs it)."""
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=2, head=4, frame=frame)
    with torch.no_grad():
        layer.lora_B.normal_()
    calls = []
    project = layer.frame_mode.layer_factors
    monkeypatch.setattr(layer.frame_mode, "layer_factors", lambda *a: calls.append(1) or project(*a))
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1
    with torch.inference_mode():
        assert torch.equal(layer(x), first) and len(calls) == 2  # inference tensors are kept apart
    layer(x).sum().backward()
    layer(x)
    assert len(calls) == 4
    with torch.no_grad():
        layer.lora_A.add_(0.5)  # an optimizer step changes A in place
        moved = layer(x)
        assert len(calls) == 5 and not torch.equal(moved, first)
    assert torch.equal(moved, layer(x).detach())  # the reused factors are the ones a fresh projection gives
    taillor.consolidate(torch.nn.Sequential(layer))  # folds ΔW into W and restarts A, B: the factors change
    with torch.no_grad():
        assert_close(layer(x), moved, "reordered", "after consolidation")
    assert len(calls) >= 7  # the new A, B were projected
