"""The head-share target: the adapted λ enters the reference penalty formula unchanged (float64 oracle), the share
matches its dense definition, the dual step moves λ the right way once per optimizer step, and one target gives
the same head share across learning rates and alpha where a fixed λ does not."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import taillor
from conftest import (assert_matches_oracle, assert_penalty_matches_oracle, assert_scalar_matches, dense_head_share,
                      dense_penalty)


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
    assert_penalty_matches_oracle(layer, value, lambda A, B: dense_penalty(layer, A, B, strength=3.25))


@pytest.mark.parametrize("frame", ["full", "head"])
def test_reference_value_on_request(frame):
    layer = make_layer(frame)
    layer.penalty_strength.fill_(123.0)
    for strength in (0.0, 1e-3, 0.7):
        assert_matches_oracle(layer.spectral_penalty(penalty=strength).detach(),
                              dense_penalty(layer, strength=strength), torch.float32, f"λ={strength}")
    model = nn.Sequential(layer)
    assert_scalar_matches(taillor.spectral_penalty(model, penalty=0.7), float(dense_penalty(layer, strength=0.7)),
                          "model-wide penalty")


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("weighting", ["head", "sigma2"])
def test_head_share_matches_dense_definition(frame, weighting):
    layer = make_layer(frame, weighting)
    assert_scalar_matches(layer.head_share(), dense_head_share(layer), "head share", kind="share")
    fresh = taillor.TailLoRLinear.from_linear(nn.Linear(40, 56), rank=3, head=6, frame=frame)
    assert float(fresh.head_share()) == 0.0  # B = 0: no update, share defined as 0


# The dual step as the docs state it, typed here (not imported: a wrong constant in taillor must fail these tests):
# log λ ← log λ + 0.2 · clamp(log(share / ρ), −2, 2), then λ kept within [1e-6, 1e2] × the starting λ.
GAIN, LOG_CLAMP, FLOOR, CEILING = 0.2, 2.0, 1e-6, 1e2


def expected_strength(strength: float, share: float, target: float, start: float) -> float:
    """Float64 oracle of one dual step from λ = ``strength`` at head share ``share`` (share 0: the clamp's −2)."""
    log_ratio = math.log(share / target) if share > 0 else -math.inf
    step = GAIN * min(max(log_ratio, -LOG_CLAMP), LOG_CLAMP)
    return min(max(strength * math.exp(step), FLOOR * start), CEILING * start)


def assert_strength(layer, expected: float, what: str) -> None:
    assert_scalar_matches(layer.penalty_strength, expected, f"λ, {what}")


def scale_head(layer, factor: float) -> None:
    """Multiply the update's head part by ``factor`` (full frame: the head rows of B and columns of A)."""
    with torch.no_grad():
        layer.lora_B[:6] *= factor
        layer.lora_A[:, :6] *= factor


@pytest.mark.parametrize("case, target, head_factor, start_multiple", [
    ("inside the clamp, up", "share/2", 1.0, 1.0),        # log 2 = 0.69: step 0.2·0.69
    ("inside the clamp, down", "share*3", 1.0, 1.0),      # log 1/3 = −1.10: step −0.22
    ("clamped at +2", "share/100", 1.0, 1.0),             # log 100 = 4.6 → 2: step 0.4
    ("clamped at -2", 0.5, 1e-3, 1.0),                    # share ~1e-7: log ratio ~ −15 → −2: step −0.4
    ("zero share clamped at -2", 0.5, 0.0, 1.0),          # head empty, tail not: share 0 → −2
    ("ceiling", "share/100", 1.0, 0.9 * CEILING),         # λ·e^0.4 would pass 100× the start
    ("floor", 0.5, 0.0, 1.2 * FLOOR),                     # λ·e^−0.4 would fall below 1e-6× the start
])
def test_dual_step_is_the_documented_formula(case, target, head_factor, start_multiple):
    start = 0.7
    layer = make_layer("full", target=0.05, penalty=start)
    scale_head(layer, head_factor)
    share = dense_head_share(layer)
    rho = {"share/2": share / 2, "share*3": share * 3, "share/100": share / 100}.get(target, target)
    layer.config = dataclasses.replace(layer.config, head_share_target=rho)
    layer.penalty_strength.fill_(start * start_multiple)
    layer.spectral_penalty()
    assert_strength(layer, expected_strength(start * start_multiple, share, rho, start), case)


def test_dual_step_once_per_optimizer_step_under_gradient_accumulation():
    """Three optimizer steps of two micro-batches each: λ takes exactly one step per optimizer step, from the share
    of the update the optimizer left (float64 oracle of each step, from the dense share before it)."""
    layer = make_layer("full", target=0.05, penalty=1.0)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)  # bounded steps
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    expected = 1.0
    for step in range(3):
        expected = expected_strength(expected, dense_head_share(layer), 0.05, 1.0)
        optimizer.zero_grad()
        for micro in x.chunk(2):
            (layer(micro).pow(2).mean() + layer.spectral_penalty()).backward()
        optimizer.step()
        assert_strength(layer, expected, f"after optimizer step {step}")


def test_dual_step_waits_for_a_change_and_for_a_nonzero_update():
    layer = make_layer("full", target=0.05, penalty=1.0)
    layer.spectral_penalty()
    stepped = float(layer.penalty_strength)
    layer.spectral_penalty()  # same A, B (gradient accumulation): no second step
    assert float(layer.penalty_strength) == stepped
    with torch.no_grad():
        layer.lora_B.zero_()
    layer.spectral_penalty()
    assert float(layer.penalty_strength) == stepped  # ΔW = 0: the share is undefined, no step
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.spectral_penalty()
    assert float(layer.penalty_strength) == stepped  # evaluation never adapts λ
    layer.train()
    with torch.no_grad():
        layer.spectral_penalty()
    assert float(layer.penalty_strength) == stepped  # nor does a call without gradients


def test_strength_stops_growing_at_its_ceiling():
    layer = make_layer("head", target=1e-6, penalty=0.5)  # a target no update meets
    for _ in range(60):
        with torch.no_grad():
            layer.lora_B.add_(0.01)  # the optimizer changed B: one dual step per call
        layer.spectral_penalty()
    assert_strength(layer, CEILING * 0.5, "ceiling")


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
