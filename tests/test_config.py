"""Every bad input of the public API raises a typed error that names the value, and changes nothing."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import taillor


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank must be >= 1, got 0"),
    (dict(rank=2.5), TypeError, "rank must be an int"),
    (dict(head=0), ValueError, "head as a count must be >= 1, got 0"),
    (dict(head=1.0), ValueError, r"head as a fraction must be in \(0, 1\), got 1.0"),
    (dict(head=-0.1), ValueError, "got -0.1"),
    (dict(head="ten"), TypeError, "'ten'"),
    (dict(head_energy=1.0), ValueError, r"head_energy must be in \(0, 1\), got 1.0"),
    (dict(head_energy=0.0), ValueError, "head_energy"),
    (dict(frame="tail"), ValueError, "frame must be one of"),
    (dict(penalty_weighting="sigma3"), ValueError, "'sigma3'"),
    (dict(penalty=-1.0), ValueError, "penalty must be >= 0"),
    (dict(penalty=float("nan")), ValueError, "finite"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(init="zeros"), ValueError, "'zeros'"),
    (dict(target_modules="("), ValueError, "not a valid regex"),
    (dict(target_modules=[]), ValueError, "empty list"),
    (dict(frame_dtype="int8"), ValueError, "frame_dtype must be one of.*'int8'"),
    (dict(max_frame_bytes=0), ValueError, "max_frame_bytes must be >= 1, got 0"),
    (dict(max_frame_bytes=1.5e9), TypeError, "max_frame_bytes must be an int, got 1500000000.0"),
])
def test_invalid_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        taillor.TailLoRConfig(**kwargs)


def test_config_is_frozen_and_round_trips():
    config = taillor.TailLoRConfig(rank=4, target_modules=["q", "v"], head=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 5
    assert taillor.TailLoRConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TailLoRConfig fields"):
        taillor.TailLoRConfig.from_dict({**config.to_dict(), "rnak": 3})
    assert config.scaling == 16 / 4
    assert taillor.TailLoRConfig(rank=4, use_rslora=True).scaling == 16 / 2


def test_default_frame_is_head_and_configs_saved_without_a_frame_read_as_full():
    assert taillor.TailLoRConfig().frame == "head"
    saved = taillor.TailLoRConfig(rank=4, frame="full").to_dict()
    assert saved["frame"] == "full" and taillor.TailLoRConfig.from_dict(saved).frame == "full"
    del saved["frame"]  # written when "full" was the default
    assert taillor.TailLoRConfig.from_dict(saved).frame == "full"


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)), nn.LayerNorm(4))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("config, error, match", [
    (taillor.TailLoRConfig(rank=5, target_modules=["2.0"]), ValueError, r"2.0: rank=5 exceeds min\(d_out, d_in\)=4"),
    (taillor.TailLoRConfig(target_modules=["q_proj"]), ValueError, "matched no nn.Linear layer.*0, 2.0"),
    (taillor.TailLoRConfig(target_modules=["3"]), TypeError, "'3' is a LayerNorm, not an nn.Linear"),
    (taillor.TailLoRConfig(rank=1, head=4, target_modules=["0", "2.0"]), ValueError, "2.0: head=4 gives h=4"),
    (taillor.TailLoRConfig(rank=1), ValueError, "target_modules is required"),
    # full frames: 8·(8+16)·4 + 2·8·4 + 4·(16+4)·4 + 2·4·4 = 1184 bytes
    (taillor.TailLoRConfig(rank=1, target_modules="all-linear", frame="full", max_frame_bytes=1000), ValueError,
     r"full frames of 2 layers would take an estimated 1.2 KiB \(1184 bytes\), more than max_frame_bytes=1000; "
     r"alternatives: frame='head' with head=0.25 would take"),
])
def test_apply_rejects_bad_input_and_changes_nothing(config, error, match):
    model = make_model()
    before, types = snapshot(model)
    with pytest.raises(error, match=match):
        taillor.apply_taillor(model, config)
    after, types_after = snapshot(model)
    assert types == types_after and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_non_finite_weight_named():
    model = make_model()
    with torch.no_grad():
        model[2][0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="2.0: the weight has non-finite"):
        taillor.apply_taillor(model, taillor.TailLoRConfig(rank=1, head=1, target_modules="all-linear"))
    assert isinstance(model[0], nn.Linear)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="got Conv1d"):
        taillor.TailLoRLinear(nn.Conv1d(2, 2, 1), taillor.TailLoRConfig())
