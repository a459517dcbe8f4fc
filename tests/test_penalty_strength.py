"""The head-share target: the adapted λ enters the reference penalty formula unchanged (float64 oracle), the share
matches its dense definition, the dual step moves λ the right way once per optimizer step, and one target gives
the same head share across learning rates and alpha where a fixed λ does not."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_matches_oracle, dense_head_share, dense_penalty
from taillor.strength import HEAD_SHARE_GAIN, STRENGTH_RANGE


def make_layer(frame, weighting="head", target=0.05, penalty=0.7, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(40, 56).to(dtype), rank=3, head=6, frame=frame,
                                              penalty=penalty, head_share_target=target, penalty_weighting=weighting)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    return layer


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("weighting", ["head", "sigma", "sigma2"])
def test_target_mode_is_the_reference_formula_at_the_adapted_strength(frame, weighting):
    layer = make_layer(frame, weighting)
    layer.penalty_strength.fill_(3.25)  # any adapted value
    layer.eval()  # no dual step: the value at the current λ_l
    value = layer.spectral_penalty()
    value.backward()
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    oracle = dense_penalty(layer, A, B, strength=3.25)
    oracle.backward()
    assert_matches_oracle(value.detach(), oracle.detach(), torch.float32, "penalty")
    assert_matches_oracle(layer.lora_A.grad, A.grad, torch.float32, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, torch.float32, "dB")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_reference_value_on_request(frame):
    layer = make_layer(frame)
    layer.penalty_strength.fill_(123.0)
    for strength in (0.0, 1e-3, 0.7):
        assert_matches_oracle(layer.spectral_penalty(penalty=strength).detach(),
                              dense_penalty(layer, strength=strength), torch.float32, f"λ={strength}")
    model = nn.Sequential(layer)
    expected = float(dense_penalty(layer, strength=0.7))
    assert abs(float(taillor.spectral_penalty(model, penalty=0.7).detach()) - expected) <= 1e-5 * expected


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("weighting", ["head", "sigma2"])
def test_head_share_matches_dense_definition(frame, weighting):
    layer = make_layer(frame, weighting)
    assert abs(float(layer.head_share()) - dense_head_share(layer)) <= 1e-5
    fresh = taillor.TailLoRLinear.from_linear(nn.Linear(40, 56), rank=3, head=6, frame=frame)
    assert float(fresh.head_share()) == 0.0  # B = 0: no update, share defined as 0


def test_dual_step_direction_size_and_once_per_optimizer_step():
    layer = make_layer("full", target=0.05, penalty=1.0)
    share = dense_head_share(layer)
    assert share > 0.05  # random A, B: about the uniform share h/m
    layer.spectral_penalty()
    up = float(layer.penalty_strength)
    assert up > 1.0 and up <= torch.exp(torch.tensor(2 * HEAD_SHARE_GAIN)).item() + 1e-6
    layer.spectral_penalty()  # same A, B (gradient accumulation): no second step
    assert float(layer.penalty_strength) == up
    with torch.no_grad():  # the optimizer changes B, so the next call steps again: now the head holds nothing
        layer.lora_B[:6] = 0
        layer.lora_A[:, :6] = 0
    layer.spectral_penalty()
    assert float(layer.penalty_strength) < up
    with torch.no_grad():
        layer.lora_B.zero_()
    before = float(layer.penalty_strength)
    layer.spectral_penalty()
    assert float(layer.penalty_strength) == before  # ΔW = 0: the share is undefined, no step
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.spectral_penalty()
    assert float(layer.penalty_strength) == before  # evaluation never adapts λ
    low, high = STRENGTH_RANGE
    assert low < before < high


def test_strength_stops_growing_at_its_ceiling():
    layer = make_layer("head", target=1e-6, penalty=0.5)  # a target no update meets
    for _ in range(60):
        with torch.no_grad():
            layer.lora_B.add_(0.01)  # the optimizer changed B: one dual step per call
        layer.spectral_penalty()
    assert float(layer.penalty_strength) == pytest.approx(STRENGTH_RANGE[1] * 0.5, rel=1e-5)


def test_config_validation_of_the_target():
    with pytest.raises(ValueError, match="head_share_target"):
        taillor.TailLoRConfig(head_share_target=1.5)
    with pytest.raises(TypeError, match="head_share_target"):
        taillor.TailLoRConfig(head_share_target="0.02")


def test_penalty_zero_turns_the_penalty_off_whatever_the_target():
    layer = make_layer("full", target=0.02, penalty=0.0)
    assert not layer.adapts_strength
    assert float(layer.spectral_penalty().detach()) == 0.0
    assert float(layer.penalty_strength) == 0.0


def _fit(lr, alpha, target, penalty, steps=100, d=32):
    """Adam on a regression to an isotropic ΔW* (share h/m = 25% if unconstrained); returns the head share."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False)
    layer = taillor.TailLoRLinear.from_linear(base, rank=4, alpha=alpha, head=0.25, penalty=penalty,
                                              head_share_target=target)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, d, generator=gen)
    y = x @ (base.weight + 0.1 * torch.randn(d, d, generator=gen)).t()
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        loss = (layer(x) - y).pow(2).mean() + layer.spectral_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(layer.head_share())


@pytest.mark.slow
def test_one_target_means_the_same_share_across_learning_rates_and_alpha():
    target = 0.02
    shares = {(lr, alpha): _fit(lr, alpha, target, 1.0) for lr in (3e-3, 1e-2) for alpha in (4, 32)}
    assert all(target / 2 <= s <= 2 * target for s in shares.values()), shares
    unconstrained = _fit(1e-2, 4, None, 0.0)
    assert unconstrained > 0.15  # without a penalty the update spreads over the whole spectrum
