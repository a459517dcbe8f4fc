"""The batched penalty op (L same-shaped layers in one call, with each update's energy ‖B A‖²) against float64
formulas, and the model's penalty run as one batched call per shape group: value, gradients and the adapted
strengths against the per-layer definition, frames shared with the layers (not copied), groups rebuilt when a
layer's buffers change."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import taillor
from taillor import functional as F
from taillor import ops
from taillor.penalty_groups import PenaltyGroup, _GROUPS
from conftest import (DTYPE_ID, KernelImpl, assert_matches_oracle, assert_penalty_matches_oracle, dense_penalty,
                      kernel_impls)


def batched_inputs(mode, L, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, d_in, d_out, h = 30, 40, 34, 7
    if mode == "full":
        A = torch.randn(L, r, k, generator=g, dtype=torch.float64)
        B = torch.randn(L, k, r, generator=g, dtype=torch.float64)
        U = V = None
        w = torch.rand(L, k, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(L, r, d_in, generator=g, dtype=torch.float64)
        B = torch.randn(L, d_out, r, generator=g, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(L, d_out, h, generator=g, dtype=torch.float64))[0].to(dtype)
        V = torch.linalg.qr(torch.randn(L, d_in, h, generator=g, dtype=torch.float64))[0].to(dtype)
        w = torch.rand(L, h, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype), U, V, w.float()


def oracle(A, B, U, V, w, c):
    """Per layer, in float64 with ΔW_l = B_l A_l materialized: c·(‖diag(ω) Uᵀ ΔW‖² + ‖ΔW V diag(ω)‖²) (U = V = I
    in the full frame) and c·‖ΔW‖²."""
    values, totals = [], []
    for l in range(A.shape[0]):
        delta = B[l].double() @ A[l].double()
        om = w[l].double().sqrt()
        left = delta if U is None else U[l].double().t() @ delta
        right = delta if V is None else delta @ V[l].double()
        values.append(c * ((om[:, None] * left).pow(2).sum() + (right * om).pow(2).sum()))
        totals.append(c * delta.pow(2).sum())
    return torch.stack(values), torch.stack(totals)


@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("r", [1, 5])
def test_batched_value_total_and_gradients_match_float64(mode, r):
    A, B, U, V, w = batched_inputs(mode, 3, r)
    A.requires_grad_(True)
    B.requires_grad_(True)
    value, total = F.spectral_penalty_batched(A, B, U, V, w, 0.3)
    grad = torch.tensor([1.0, -0.5, 2.0])
    (value * grad).sum().backward()
    A64 = A.detach().double().requires_grad_(True)
    B64 = B.detach().double().requires_grad_(True)
    value64, total64 = oracle(A64, B64, U, V, w, 0.3)
    (value64 * grad.double()).sum().backward()
    assert value.shape == total.shape == (3,) and not total.requires_grad
    assert_matches_oracle(value.detach(), value64.detach(), torch.float32, "value")
    assert_matches_oracle(total, total64.detach(), torch.float32, "total")
    assert_matches_oracle(A.grad, A64.grad, torch.float32, "dA")
    assert_matches_oracle(B.grad, B64.grad, torch.float32, "dB")


@pytest.mark.parametrize("mode", ["full", "head"])
def test_gradcheck_and_opcheck(mode):
    A, B, U, V, w = batched_inputs(mode, 2, 3, dtype=torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, B: F.spectral_penalty_batched(A, B, U, V, w.double(), 0.7)[0], (A, B))
    torch.library.opcheck(ops.spectral_penalty_batched_fwd, (A.detach(), B.detach(), U, V, w, 0.7))
    torch.library.opcheck(ops.spectral_penalty_batched_bwd, (torch.rand(2, dtype=torch.float64), A.detach(),
                                                              B.detach(), U, V, w, 0.7))


# ---------------------------------------------------------------------------------------------------------------
# the model's penalty, one batched call per shape group
# ---------------------------------------------------------------------------------------------------------------
def four_layer_model(frame, target, protect=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 30), nn.Linear(30, 30), nn.Linear(30, 10))
    config = taillor.TailLoRConfig(rank=2, head=4, frame=frame, head_share_target=target, penalty=0.6,
                                   target_modules="all-linear", protect_tasks=protect, penalty_weighting="sigma")
    taillor.apply_taillor(model, config, progress=False)
    gen = torch.Generator().manual_seed(1)
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    return model


def layers_of(model):
    return [layer for _, layer in taillor.iter_taillor_layers(model)]


@pytest.mark.parametrize("frame", ["full", "head"])
def test_grouped_penalty_matches_the_dense_sum_over_layers(frame):
    model = four_layer_model(frame, None)
    value = taillor.spectral_penalty(model)
    value.backward()
    units = _GROUPS[model]
    assert sum(isinstance(u, PenaltyGroup) for u in units) == 1  # the two 30×30 layers
    expected = 0.0
    for layer in layers_of(model):
        A = layer.lora_A.detach().double().requires_grad_(True)
        B = layer.lora_B.detach().double().requires_grad_(True)
        oracle_value = dense_penalty(layer, A, B)
        oracle_value.backward()
        expected = expected + oracle_value.detach()
        assert_matches_oracle(layer.lora_A.grad, A.grad, torch.float32, "dA")
        assert_matches_oracle(layer.lora_B.grad, B.grad, torch.float32, "dB")
    assert_matches_oracle(value.detach(), expected, torch.float32, "penalty")


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("protect", [False, True])
def test_grouped_dual_steps_equal_the_per_layer_ones(frame, protect):
    model = four_layer_model(frame, 0.05, protect)
    if protect:
        taillor.consolidate(model)
        for layer in layers_of(model):
            with torch.no_grad():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model)
    for _ in range(3):
        grouped = taillor.spectral_penalty(model)
        alone = sum(layer.spectral_penalty() for layer in layers_of(reference))
        assert_matches_oracle(grouped.detach(), alone.detach().double(), torch.float32, "penalty")
        for a, b in zip(layers_of(model), layers_of(reference)):
            assert_matches_oracle(a.penalty_strength, b.penalty_strength.double(), torch.float32, "λ")
        before = [float(a.penalty_strength) for a in layers_of(model)]
        taillor.spectral_penalty(model)  # the same A, B again (gradient accumulation): no second step
        assert [float(a.penalty_strength) for a in layers_of(model)] == before
        for a, b in zip(layers_of(model), layers_of(reference)):
            with torch.no_grad():  # an optimizer step on both
                a.lora_A.mul_(1.1)
                b.lora_A.mul_(1.1)
    assert any(float(layer.penalty_strength) != 0.6 for layer in layers_of(model))


def test_groups_share_the_frames_and_follow_changes():
    model = four_layer_model("head", 0.05, protect=True)
    taillor.spectral_penalty(model)
    (group,) = [u for u in _GROUPS[model] if isinstance(u, PenaltyGroup)]
    stack = group.stacks["U"]
    for i, layer in enumerate(group.layers):  # the layer's frame is its slice of the stack, not a copy
        assert layer.frame.U.data_ptr() == stack[i].data_ptr()
        assert layer.penalty_strength.data_ptr() == group.stacks["penalty_strength"][i].data_ptr()
    assert not group.protects
    taillor.consolidate(model)  # the finished task's bases appear: the group is rebuilt with them
    taillor.spectral_penalty(model)
    (group,) = [u for u in _GROUPS[model] if isinstance(u, PenaltyGroup)]
    assert group.protects and group.stacks["protect_U"].shape[0] == 2
    model.double()  # buffers replaced: rebuilt in float64, and still the per-layer value
    value = taillor.spectral_penalty(model, penalty=0.6)
    expected = sum(layer.spectral_penalty(penalty=0.6) for layer in layers_of(model))
    assert_matches_oracle(value.detach(), expected.detach(), torch.float32, "float64 model")
    assert all(u.valid() for u in _GROUPS[model] if isinstance(u, PenaltyGroup))


@pytest.mark.parametrize("impl", kernel_impls("spectral_penalty", ("eager", "interpreter", "compiled")), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("mode", ["full", "head"])
def test_launchers_match_float64(impl, dtype, mode):
    """Every implementation's launchers (eager; Triton in the interpreter; compiled on a GPU) against the float64
    formulas, each allowed twice the eager error in ``dtype`` plus the floor."""
    forward, backward = impl.launchers("spectral_penalty_batched")
    eager_forward, eager_backward = KernelImpl("eager").launchers("spectral_penalty_batched")
    A, B, U, V, w = (None if t is None else t.to(impl.device) for t in batched_inputs(mode, 3, 5, dtype))
    value, total = forward(A, B, U, V, w, 0.3)
    assert value.shape == total.shape == (3,) and value.dtype == dtype
    A64 = A.detach().cpu().double().requires_grad_(True)
    B64 = B.detach().cpu().double().requires_grad_(True)
    cpu = (lambda t: None if t is None else t.cpu())
    value64, total64 = oracle(A64, B64, cpu(U), cpu(V), w.cpu(), 0.3)
    grad = torch.tensor([1.0, -0.5, 2.0], device=impl.device)
    (value64 * grad.cpu().double()).sum().backward()
    eager_value, eager_total = eager_forward(A, B, U, V, w, 0.3)
    assert_matches_oracle(value, value64.detach(), dtype, "value", eager=eager_value)
    assert_matches_oracle(total, total64.detach(), dtype, "total", eager=eager_total)
    dA, dB = backward(grad, A, B, U, V, w, 0.3)
    eager_dA, eager_dB = eager_backward(grad, A, B, U, V, w, 0.3)
    assert dA.shape == A.shape and dB.shape == B.shape and dA.dtype == dtype
    assert_matches_oracle(dA, A64.grad, dtype, "dA", eager=eager_dA)
    assert_matches_oracle(dB, B64.grad, dtype, "dB", eager=eager_dB)


@pytest.mark.parametrize("frame", ["full", "head"])
def test_layer_adaptive_penalty_with_triton_matches_the_oracle(triton_layer_device, frame):
    """A layer's adaptive penalty runs the batched op unbatched: with the Triton backend forced, its dual step and
    value match the float64 definitions (share, then λ·penalty at the adapted λ)."""
    import math
    from conftest import dense_head_share
    from taillor.strength import HEAD_SHARE_GAIN
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(40, 56).to(triton_layer_device), rank=3, head=6,
                                              frame=frame, penalty=0.4, head_share_target=0.05)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(2)))
    share = dense_head_share(layer)
    with taillor.use_backend("triton"):
        value = layer.spectral_penalty()
        value.backward()
    expected = 0.4 * math.exp(HEAD_SHARE_GAIN * max(-2.0, min(2.0, math.log(share / 0.05))))
    assert_matches_oracle(layer.penalty_strength, torch.tensor(expected, dtype=torch.float64), torch.float32, "λ")
    strength = float(layer.penalty_strength)
    assert_penalty_matches_oracle(layer, value, lambda A, B: dense_penalty(layer, A, B, strength=strength))
