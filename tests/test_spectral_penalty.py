"""The Gram-form penalty against the materialized float64 definition, its gradients, weightings and modes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from taillor import functional as F
from conftest import assert_matches_oracle, dense_penalty


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
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    oracle = dense_penalty(layer, A, B)
    oracle.backward()
    assert_matches_oracle(value.detach(), oracle.detach(), torch.float32, "penalty")
    assert_matches_oracle(layer.lora_A.grad, A.grad, torch.float32, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, torch.float32, "dB")


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
    assert abs(float(total.detach()) - expected) <= 1e-5 * expected
