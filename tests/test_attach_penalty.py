"""taillor.attach_penalty: the penalty's gradient added once per optimizer step by a hook equals the loss form
(gradient accumulation, AMP's grad scaler), is added after clipping (not clipped), and detaches with remove()."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_matches_oracle, dense_penalty
from tiny_models import nudge_lora_B

F64 = torch.float64


def make_model(adaptive: bool = True) -> nn.Module:
    """Two float64 TailLoR layers (full and adaptive λ, or fixed λ = 3) with a nonzero update to start from."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    config = taillor.TailLoRConfig(rank=2, alpha=4, head=3, target_modules=["0", "2"], penalty=1.0 if adaptive else 3.0,
                                   head_share_target=0.05 if adaptive else None)
    taillor.apply_taillor(model, config, progress=False)
    nudge_lora_B(model, seed=1)
    return model


def data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 12, generator=g, dtype=F64), torch.randn(8, 8, generator=g, dtype=F64)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainable(model)])


def train(form: str, accumulation: int, steps: int = 3, scaler=None, max_norm=None, adaptive=True):
    """Adam steps on a regression loss, the penalty in the loss ("loss") or attached ("attach"); returns the
    trained parameters (flat) and the layers' λ."""
    model = make_model(adaptive)
    optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
    if form == "attach":
        taillor.attach_penalty(optimizer, model)
    x, y = data()
    for _ in range(steps):
        for xb, yb in zip(x.chunk(accumulation), y.chunk(accumulation)):
            loss = ((model(xb) - yb) ** 2).mean() / accumulation
            if form == "loss":
                loss = loss + taillor.spectral_penalty(model) / accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable(model), max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    strengths = torch.stack([layer.penalty_strength for _, layer in taillor.iter_taillor_layers(model)])
    return flat(model), strengths


@pytest.mark.parametrize("accumulation", [1, 4])
def test_attached_equals_loss_form_with_accumulation(accumulation):
    attached, lam_attached = train("attach", accumulation)
    loss_form, lam_loss = train("loss", accumulation)
    assert_matches_oracle(attached, loss_form, F64, f"parameters, accumulation {accumulation}")
    assert_matches_oracle(lam_attached, lam_loss, F64, "adapted λ (one dual step per optimizer step)")
    assert not torch.equal(lam_attached, torch.ones_like(lam_attached)), "λ must have adapted"


def test_attached_equals_loss_form_under_the_grad_scaler():
    attached, lam_attached = train("attach", 2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    loss_form, lam_loss = train("loss", 2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert_matches_oracle(attached, loss_form, F64, "parameters with the grad scaler")
    assert_matches_oracle(lam_attached, lam_loss, F64, "adapted λ with the grad scaler")


def test_attached_equals_loss_form_while_the_clip_does_not_bind():
    attached, _ = train("attach", 4, max_norm=1e6)
    loss_form, _ = train("loss", 4, max_norm=1e6)
    assert_matches_oracle(attached, loss_form, F64, "parameters with a non-binding clip")


def _gradients_at_step(model, optimizer, accumulation, max_norm=None, scaler=None):
    """The gradients the optimizer reads (captured by a pre-hook registered after attach_penalty's) in one step."""
    seen = {}
    optimizer.register_step_pre_hook(
        lambda *_: seen.update({id(p): p.grad.detach().clone() for p in trainable(model)}))
    x, y = data()
    for xb, yb in zip(x.chunk(accumulation), y.chunk(accumulation)):
        loss = ((model(xb) - yb) ** 2).mean() / accumulation
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(trainable(model), max_norm)
        assert float(norm) > 2 * max_norm, "the clip must bind for this test to mean anything"
    (scaler.step(optimizer) if scaler is not None else optimizer.step())
    return seen


def _oracle_gradients(model, accumulation, max_norm=None):
    """Float64 oracle: the task gradient (clipped to max_norm when given), plus the dense penalty's gradient."""
    x, y = data()
    task = {id(p): torch.zeros_like(p) for p in trainable(model)}
    for xb, yb in zip(x.chunk(accumulation), y.chunk(accumulation)):
        grads = torch.autograd.grad(((model(xb) - yb) ** 2).mean() / accumulation, trainable(model))
        for p, g in zip(trainable(model), grads):
            task[id(p)] += g
    if max_norm is not None:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in task.values()))
        task = {k: g * (max_norm / norm) for k, g in task.items()}
    for _, layer in taillor.iter_taillor_layers(model):
        A = layer.lora_A.detach().clone().requires_grad_(True)
        B = layer.lora_B.detach().clone().requires_grad_(True)
        dA, dB = torch.autograd.grad(dense_penalty(layer, A, B), (A, B))
        task[id(layer.lora_A)] = task[id(layer.lora_A)] + dA
        task[id(layer.lora_B)] = task[id(layer.lora_B)] + dB
    return task


@pytest.mark.parametrize("accumulation,max_norm,use_scaler", [(1, None, False), (4, None, False), (4, 1e-3, False),
                                                              (2, 1e-3, True)])
def test_gradient_read_by_the_optimizer_matches_the_dense_oracle(accumulation, max_norm, use_scaler):
    """∇P enters once per step, after unscaling, unclipped: the task gradient (clipped) + the dense penalty's."""
    model = make_model(adaptive=False)
    oracle = _oracle_gradients(model, accumulation, max_norm)
    optimizer = torch.optim.SGD(trainable(model), lr=0.0)
    taillor.attach_penalty(optimizer, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
    seen = _gradients_at_step(model, optimizer, accumulation, max_norm, scaler)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_matches_oracle(seen[id(p)], oracle[id(p)], F64, f"{name} gradient")


def test_remove_detaches_the_penalty():
    model = make_model(adaptive=False)
    optimizer = torch.optim.SGD(trainable(model), lr=0.0)
    handle = taillor.attach_penalty(optimizer, model)
    assert handle.attached
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached
    seen = _gradients_at_step(model, optimizer, 1)
    x, y = data()
    task = torch.autograd.grad(((model(x) - y) ** 2).mean(), trainable(model))
    for p, g in zip(trainable(model), task):
        assert_matches_oracle(seen[id(p)], g, F64, "task gradient only after remove()")


def test_bad_inputs_attach_nothing():
    model = make_model()
    partial = torch.optim.SGD([next(iter(taillor.iter_taillor_layers(model)))[1].lora_A], lr=0.1)
    with pytest.raises(ValueError, match="does not step A and B"):
        taillor.attach_penalty(partial, model)
    assert not partial._optimizer_step_pre_hooks
    plain = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no TailLoRLinear"):
        taillor.attach_penalty(torch.optim.SGD(plain.parameters(), lr=0.1), plain)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        taillor.attach_penalty(object(), model)
