"""Frames that fit: the frame's storage dtype, the estimate of its bytes, and the memory budget that apply_taillor
checks before computing anything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_matches_oracle, dense_layer_oracle, dense_penalty


def two_layers(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 56), nn.Tanh(), nn.Linear(56, 24)).to(dtype)


def frame_nbytes(model) -> dict[str, int]:
    return {name: sum(t.numel() * t.element_size() for t in (layer.frame.U, layer.frame.S, layer.frame.V,
                                                                layer.frame.omega2))
            for name, layer in taillor.iter_taillor_layers(model)}


@pytest.mark.parametrize("frame, frame_dtype", [("full", None), ("head", None), ("full", "bfloat16"),
                                                ("head", "float16")])
def test_estimate_is_the_frames_bytes(frame, frame_dtype):
    model = two_layers()
    config = taillor.TailLoRConfig(rank=2, target_modules="all-linear", frame=frame, head=5, frame_dtype=frame_dtype)
    estimate = taillor.estimate_frame_bytes(model, config)
    taillor.apply_taillor(model, config, progress=False)
    assert estimate == frame_nbytes(model)


@pytest.mark.parametrize("model_dtype, frame_dtype, stored", [
    (torch.bfloat16, None, torch.bfloat16), (torch.float16, None, torch.float16), (torch.float32, None, torch.float32),
    (torch.bfloat16, "float32", torch.float32), (torch.float32, "bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("frame", ["full", "head"])
def test_frame_dtype_default_and_choice_match_the_oracle(model_dtype, frame_dtype, stored, frame):
    """U and V are stored in the chosen dtype (default: a 16-bit model's own); the layer's output and A, B
    gradients match the float64 oracle of that frame within the tolerance of the coarser of the two dtypes."""
    torch.manual_seed(1)
    linear = nn.Linear(48, 40).to(model_dtype)
    layer = taillor.TailLoRLinear.from_linear(linear, rank=3, head=5, frame=frame, frame_dtype=frame_dtype)
    assert layer.frame.U.dtype == stored and layer.frame.V.dtype == stored
    assert layer.frame.S.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    x = torch.randn(6, 48, dtype=model_dtype)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, _, dA64, dB64 = dense_layer_oracle(layer, x, dy, linear.weight, linear.bias)
    coarse = model_dtype if stored == torch.float32 else stored
    assert_matches_oracle(y, y64, coarse, "output")
    assert_matches_oracle(layer.lora_A.grad, dA64, coarse, "dA")
    assert_matches_oracle(layer.lora_B.grad, dB64, coarse, "dB")


def test_penalty_on_a_16_bit_head_frame_keeps_the_stored_frame_for_backward():
    """A bfloat16 head frame with float32 A, B: the penalty matches the float64 oracle of the stored frame, and
    autograd saves the bfloat16 U and V themselves, not float32 copies (on a 1B model those copies were 1.2 GB)."""
    torch.manual_seed(2)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(48, 40), rank=3, head=5, frame="head",
                                              frame_dtype="bfloat16", penalty=0.5, head_share_target=None)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        penalty = layer.spectral_penalty()
    framelike = [t for t in saved if t.shape in (layer.frame.U.shape, layer.frame.V.shape)]
    assert framelike and all(t.dtype == torch.bfloat16 for t in framelike), [(t.shape, t.dtype) for t in saved]
    penalty.backward()
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    oracle = dense_penalty(layer, A, B)
    oracle.backward()
    assert_matches_oracle(penalty, oracle, torch.float32, "penalty")
    assert_matches_oracle(layer.lora_A.grad, A.grad, torch.float32, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, torch.float32, "dB")


def test_refused_budget_names_bytes_and_alternative_and_computes_nothing(monkeypatch):
    model = two_layers()
    config = taillor.TailLoRConfig(rank=2, target_modules="all-linear", max_frame_bytes=10_000)
    full = sum(taillor.estimate_frame_bytes(model, config).values())
    head = sum(taillor.estimate_frame_bytes(model, taillor.TailLoRConfig(
        rank=2, target_modules="all-linear", frame="head")).values())
    assert head < 10_000 < full
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def no_frames(*args, **kwargs):
        raise AssertionError("a frame was computed before the budget check")
    monkeypatch.setattr("taillor.model._build_frames", no_frames)
    with pytest.raises(ValueError, match=rf"\({full} bytes\), more than max_frame_bytes=10000.*frame='head'"):
        taillor.apply_taillor(model, config, progress=False)
    assert not list(taillor.iter_taillor_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    monkeypatch.undo()
    # The head frame fits the same budget; the budget is runtime-only (not saved with the adapter).
    head_config = taillor.TailLoRConfig(rank=2, target_modules="all-linear", frame="head", max_frame_bytes=10_000)
    taillor.apply_taillor(model, head_config, progress=False)
    assert sum(frame_nbytes(model).values()) == head <= 10_000
    assert "max_frame_bytes" not in head_config.to_dict()
