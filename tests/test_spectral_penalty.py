"""The spectral penalty op in r×r Gram form against the materialized float64 definition: value, gradients,
weightings and both frame modes.

Layer and model level: TailLoRLinear.spectral_penalty and taillor.spectral_penalty, gradcheck; with the Triton
backend forced the layer's penalty matches the oracle at least as well as the eager path. Launcher level: every
implementation on this machine (eager; Triton in the interpreter; compiled on a GPU, marked ``gpu``), with the
closed-form gradients checked against autograd and against the definition.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from taillor import functional as F
from conftest import (DTYPE_ID, DTYPES, assert_matches_oracle, assert_penalty_matches_oracle, assert_scalar_matches,
                      dense_penalty, kernel_impls)


def make_layer(frame, weighting="head", d_in=40, d_out=56, rank=3, dtype=torch.float32):
    torch.manual_seed(1)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(d_in, d_out).to(dtype), rank=rank, head=6, frame=frame,
                                              penalty=0.1, head_share_target=None, penalty_weighting=weighting)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("weighting", ["head", "sigma", "sigma2"])
def test_penalty_and_gradients_match_materialized_definition(frame, weighting):
    layer = make_layer(frame, weighting)
    value = layer.spectral_penalty()
    value.backward()
    assert_penalty_matches_oracle(layer, value, lambda A, B: dense_penalty(layer, A, B))


def test_penalty_weights():
    layer = make_layer("full", "sigma")
    S = layer.frame.S
    torch.testing.assert_close(layer.frame.omega2, (S / S[0]) ** 2)
    layer2 = make_layer("full", "sigma2")
    torch.testing.assert_close(layer2.frame.omega2, (S / S[0]) ** 4)
    layer3 = make_layer("full", "head")
    assert layer3.frame.omega2[:6].eq(1).all() and layer3.frame.omega2[6:].eq(0).all()
    head = make_layer("head", "head")
    assert head.frame.omega2.shape == (6,) and head.frame.omega2.eq(1).all()


def test_penalty_ignores_tail_only_updates_and_sees_head_updates():
    layer = make_layer("full")
    h = layer.head_size
    with torch.no_grad():
        layer.lora_A[:, :h] = 0
        layer.lora_B[:h] = 0
    assert float(layer.spectral_penalty().detach()) == 0.0
    with torch.no_grad():
        layer.lora_B[0] = 1.0
    assert float(layer.spectral_penalty().detach()) > 0.0


def test_gradcheck_float64_both_modes():
    torch.manual_seed(0)
    r, k = 3, 9
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    B = torch.randn(k, r, dtype=torch.float64, requires_grad=True)
    w = torch.rand(k, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda A, B: F.spectral_penalty(A, B, None, None, w, 0.7), (A, B))
    d_in, d_out, h = 8, 6, 4
    U = torch.linalg.qr(torch.randn(d_out, h, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, h, dtype=torch.float64)).Q
    Ah = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    Bh = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A, B: F.spectral_penalty(A, B, U, V, w[:h], 0.3), (Ah, Bh))


def test_model_penalty_is_sum_over_layers():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=3, penalty=0.5, head_share_target=None,
                                                       target_modules=["0", "2"]))
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    total = taillor.spectral_penalty(model)
    expected = sum(float(dense_penalty(layer)) for _, layer in taillor.iter_taillor_layers(model))
    assert_scalar_matches(total, expected, "model-wide penalty")


# ---------------------------------------------------------------------------------------------------------------
# the layer's penalty with the Triton backend forced (interpreter on the CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------------
def penalty_and_grads(layer, backend):
    """(value, dA, dB) of the layer's penalty under ``use_backend(backend)``."""
    with taillor.use_backend(backend):
        layer.zero_grad(set_to_none=True)
        value = layer.spectral_penalty()
        value.backward()
    out = value.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.gpu  # compiled kernels on a GPU; the Triton interpreter on the CPU
@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_triton_layer_penalty_matches_oracle_as_well_as_eager(triton_layer_device, frame, dtype):
    device = triton_layer_device
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(96, 80).to(device, dtype), rank=4, head=8, frame=frame,
                                              penalty=0.3, head_share_target=None, penalty_weighting="sigma")
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1)) if device == "cpu" else layer.lora_B.normal_()
    eager = penalty_and_grads(layer, "eager")
    triton = penalty_and_grads(layer, "triton")
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    oracle = dense_penalty(layer, A, B)
    oracle.backward()
    for name, got, ref, expected in zip(("penalty", "dA", "dB"), triton, eager, (oracle.detach(), A.grad, B.grad)):
        assert_matches_oracle(got, expected, dtype, name, eager=ref)


# ---------------------------------------------------------------------------------------------------------------
# launchers of every implementation (eager, Triton interpreter, compiled Triton on a GPU)
# ---------------------------------------------------------------------------------------------------------------
def _d(t):
    return None if t is None else t.detach().cpu().double()


def penalty_eager(A, B, U, V, w, c):
    """The penalty in Gram form, computed by PyTorch in the inputs' dtype (float64 inputs: the oracle)."""
    w = w.to(A.dtype)
    if U is None:
        Bh, Ah = B, A
    else:
        Bh, Ah = U.T @ B, A @ V
    return c * ((Bh.T @ (w[:, None] * Bh)) * (A @ A.T)).sum() + c * ((B.T @ B) * ((Ah * w) @ Ah.T)).sum()


def penalty_grads_eager(A, B, U, V, w, c, g):
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


def penalty_inputs(mode, r, dtype, device="cpu", seed=3):
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
        U = torch.linalg.qr(torch.randn(d_out, h, generator=g, dtype=torch.float64))[0].to(device, dtype)
        V = torch.linalg.qr(torch.randn(d_in, h, generator=g, dtype=torch.float64))[0].to(device, dtype)
        w = torch.rand(h, generator=g, dtype=torch.float64)
    return A.to(device, dtype), B.to(device, dtype), U, V, w.float().to(device)


def check_spectral_penalty(forward, backward, mode, r, dtype, device="cpu"):
    """Value and gradients of one implementation against the float64 closed forms, each allowed twice the error
    of the same closed forms in ``dtype`` plus the floor."""
    A, B, U, V, w = penalty_inputs(mode, r, dtype, device)
    c, g = 0.3, 1.7
    val = forward(A, B, U, V, w, c)
    assert val.shape == () and val.dtype == dtype
    oracle = penalty_eager(_d(A), _d(B), _d(U), _d(V), _d(w), c)
    assert_matches_oracle(val, oracle, dtype, "value", eager=penalty_eager(A, B, U, V, w, c))
    dA, dB = backward(torch.tensor(g, device=device), A, B, U, V, w, c)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dtype and dB.dtype == dtype
    dA64, dB64 = penalty_grads_eager(_d(A), _d(B), _d(U), _d(V), _d(w), c, g)
    dA_e, dB_e = penalty_grads_eager(A, B, U, V, w, c, g)
    assert_matches_oracle(dA, dA64, dtype, "dA", eager=dA_e)
    assert_matches_oracle(dB, dB64, dtype, "dB", eager=dB_e)


@pytest.mark.parametrize("impl", kernel_impls("spectral_penalty"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("r", [1, 5, 40])
def test_launchers_match_float64_oracle(impl, dtype, mode, r):
    check_spectral_penalty(*impl.launchers("spectral_penalty"), mode, r, dtype, impl.device)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_closed_form_gradients_match_autograd_and_the_definition(mode):
    # The closed forms used as oracle above agree with autograd on the float64 Gram-form value.
    A, B, U, V, w = penalty_inputs(mode, 3, torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    penalty_eager(A, B, U, V, w.double(), 0.3).backward(torch.tensor(1.7, dtype=torch.float64))
    dA, dB = penalty_grads_eager(A.detach(), B.detach(), U, V, w.double(), 0.3, 1.7)
    assert_matches_oracle(A.grad, dA, torch.float64, "dA")
    assert_matches_oracle(B.grad, dB, torch.float64, "dB")
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
    assert_matches_oracle(penalty_eager(A, B, U, V, w.double(), 0.3), direct, torch.float64, "value")


@pytest.mark.parametrize("impl", kernel_impls("spectral_penalty", ("interpreter",)), indirect=True)
def test_triton_launchers_reject_bad_inputs(impl):
    forward, backward = impl.launchers("spectral_penalty")
    A, B, U, V, w = penalty_inputs("head", 2, torch.float32)
    with pytest.raises(ValueError, match="U and V"):
        forward(A, B, U, None, w, 1.0)
    with pytest.raises(ValueError, match="omega2 has length"):
        forward(A, B, U, V, w[:-1], 1.0)
    with pytest.raises(ValueError, match="V has shape"):
        forward(A, B, U, V[:-1], w, 1.0)
    with pytest.raises(ValueError, match="omega2 must be contiguous"):
        forward(A, B, U, V, torch.rand(2 * w.shape[0])[::2], 1.0)
    with pytest.raises(ValueError, match="grad"):
        backward(torch.ones(2), A, B, U, V, w, 1.0)
    Af, Bf, _, _, wf = penalty_inputs("full", 2, torch.float32)
    with pytest.raises(ValueError, match="B has shape"):
        forward(Af, Bf[:-1], None, None, wf, 1.0)
