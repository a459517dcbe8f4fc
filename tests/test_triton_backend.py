"""Forced Triton backend through the public layer, both adapter routes: outputs, input grads, A/B grads and the
penalty match the float64 oracle at least as well as the eager path does (error <= 2 x eager error + floor).

On a machine without CUDA the kernels run in the Triton interpreter (the ``interpreter`` fixture, per test); with
CUDA they run compiled on the GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from conftest import FLOOR, dense_penalty, normalized_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        request.getfixturevalue("interpreter")


def make_layer(frame, dtype, **options):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80).to(DEVICE, dtype)
    layer = taillor.TailLoRLinear.from_linear(linear, rank=4, head=8, frame=frame, penalty=0.3, head_share_target=None,
                                              penalty_weighting="sigma", **options)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1)) if DEVICE == "cpu" else layer.lora_B.normal_()
    return layer


def run(layer, x, dy, backend, route="split"):
    with taillor.use_backend(backend, adapter=route):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        grads = {"y": y.detach(), "dx": x.grad, "dA": layer.lora_A.grad.clone(), "dB": layer.lora_B.grad.clone()}
        layer.zero_grad(set_to_none=True)
        penalty = layer.spectral_penalty()
        penalty.backward()
    grads.update(penalty=penalty.detach(), dA_pen=layer.lora_A.grad.clone(), dB_pen=layer.lora_B.grad.clone())
    return grads


def oracle(layer, x, dy):
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    U, V, s = layer.frame.U.double(), layer.frame.V.double(), layer.scaling
    delta = s * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)
    y = x64 @ (layer.base_layer.weight.double() + delta).t() + layer.base_layer.bias.double()
    y.backward(dy.double())
    out = {"y": y.detach(), "dx": x64.grad, "dA": A.grad, "dB": B.grad}
    A2 = layer.lora_A.detach().double().requires_grad_(True)
    B2 = layer.lora_B.detach().double().requires_grad_(True)
    penalty = dense_penalty(layer, A2, B2)
    penalty.backward()
    out.update(penalty=penalty.detach(), dA_pen=A2.grad, dB_pen=B2.grad)
    return out


@pytest.mark.parametrize("route", ["split", "fused"])
@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_oracle_as_well_as_eager(route, frame, dtype):
    layer = make_layer(frame, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 96, generator=g).to(DEVICE, dtype)
    dy = torch.randn(37, 80, generator=g).to(DEVICE, dtype)
    eager = run(layer, x, dy, "eager")
    triton = run(layer, x, dy, "triton", route)
    reference = oracle(layer, x, dy)
    for name, expected in reference.items():
        err_eager = normalized_error(eager[name], expected)
        err_triton = normalized_error(triton[name], expected)
        bound = 2 * err_eager + FLOOR[dtype]
        assert err_triton <= bound, f"{name}: triton error {err_triton:.2e} > 2 x eager {err_eager:.2e} + floor"


@pytest.mark.parametrize("route", ["split", "fused"])
def test_triton_dropout_path(route):
    layer = make_layer("full", torch.float32, dropout=0.3).train()
    x = torch.randn(21, 96).to(DEVICE)
    dy = torch.randn(21, 80).to(DEVICE)
    results = []
    for backend in ("eager", "triton"):
        torch.manual_seed(7)
        results.append(run(layer, x, dy, backend, route))
    for name in ("y", "dx", "dA", "dB"):
        assert normalized_error(results[1][name], results[0][name]) <= 1e-5, name


@pytest.mark.parametrize("route", ["split", "fused"])
def test_opcheck_with_triton_kernels(route):
    """The Triton kernels behind the custom ops pass opcheck too (schema, fake, autograd registration)."""
    from taillor import ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g).to(DEVICE).requires_grad_(True)
    W, b = torch.randn(9, 12, generator=g).to(DEVICE), torch.randn(9, generator=g).to(DEVICE)
    P = torch.randn(12, 3, generator=g).to(DEVICE).requires_grad_(True)
    Q = torch.randn(9, 3, generator=g).to(DEVICE).requires_grad_(True)
    A = torch.randn(3, 8, generator=g).to(DEVICE).requires_grad_(True)
    B = torch.randn(8, 3, generator=g).to(DEVICE).requires_grad_(True)
    U = torch.linalg.qr(torch.randn(9, 8, generator=g)).Q.to(DEVICE)
    V = torch.linalg.qr(torch.randn(12, 8, generator=g)).Q.to(DEVICE)
    w = torch.rand(8, generator=g).to(DEVICE)
    with taillor.use_backend("triton", adapter=route):
        torch.library.opcheck(ops.tail_adapter_fwd, (x, W, b, P, Q, 0.5, None))
        torch.library.opcheck(ops.spectral_projection_fwd, (A, B, U, V, None))
        torch.library.opcheck(ops.spectral_penalty_fwd, (A, B, None, None, w, 0.5))
