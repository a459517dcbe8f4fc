"""Bad inputs get taillor's typed errors, named, and change nothing: integer and bool inputs (TypeError, as
nn.Linear), a wrong input width (the layer and the width it expects), a truncated or corrupt adapter file
(AdapterFileError naming the file)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import taillor
from taillor.io import CONFIG_NAME, WEIGHTS_NAME


def model_with_taillor() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    return taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=3, target_modules=["0", "2"]),
                                 progress=False)


def snapshot(model: nn.Module) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, layer in taillor.iter_taillor_layers(model):  # non-persistent parts of a layer's state
        state.update({f"{name}.{k}": getattr(layer, k).clone() for k in ("consolidated_up", "consolidated_down",
                                                                           "penalty_strength")})
    return state


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), f"{key} changed"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_bool_inputs_raise_type_error_as_nn_linear(dtype):
    model = model_with_taillor()
    before = snapshot(model)
    x = torch.ones(3, 12, dtype=dtype)
    with pytest.raises((TypeError, RuntimeError)):  # nn.Linear refuses them too (it does not cast)
        nn.Linear(12, 16)(x)
    with pytest.raises(TypeError, match=r"^0: expected a floating-point input, got torch\.(int|bool)"):
        model(x)
    assert_unchanged(model, before)


def test_wrong_width_names_the_layer_and_the_expected_width():
    model = model_with_taillor()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^0: expected an input of width 12 .*got shape \(3, 13\)"):
        model(torch.randn(3, 13))
    layer = model[2]
    with pytest.raises(ValueError, match=r"^2: expected an input of width 16 .*got shape \(2, 5, 15\)"):
        layer(torch.randn(2, 5, 15))
    layer.merge()
    with pytest.raises(ValueError, match="width 16"):  # merged layers check too
        layer(torch.randn(4, 3))
    layer.unmerge()
    assert_unchanged(model, before)


def _saved(tmp_path) -> str:
    model = model_with_taillor()
    with torch.no_grad():
        for _, layer in taillor.iter_taillor_layers(model):
            layer.lora_B.normal_()
    taillor.consolidate(model)
    directory = str(tmp_path / "adapter")
    taillor.save_adapter(model, directory)
    return directory


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _garble(path):
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 16)


def _bad_json(path):
    with open(path, "w") as f:
        f.write('{"format": "taillor-adapter", "format_vers')


def _no_layers(path):
    with open(path) as f:
        document = json.load(f)
    del document["layers"]
    with open(path, "w") as f:
        json.dump(document, f)


def _no_digest(directory):
    """As an adapter saved before the config named its weights' SHA-256 reads: the safetensors reader then meets
    the damage itself."""
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        document = json.load(f)
    del document["weights_sha256"]
    with open(path, "w") as f:
        json.dump(document, f)


@pytest.mark.parametrize("damage,name,digest", [
    (_truncate, WEIGHTS_NAME, True), (_garble, WEIGHTS_NAME, True), (_truncate, WEIGHTS_NAME, False),
    (_garble, WEIGHTS_NAME, False), (_bad_json, CONFIG_NAME, True), (_no_layers, CONFIG_NAME, True),
    (_garble, CONFIG_NAME, True)])
def test_corrupt_or_truncated_adapter_raises_adapter_file_error(tmp_path, damage, name, digest):
    directory = _saved(tmp_path)
    if not digest:
        _no_digest(directory)
    damage(os.path.join(directory, name))
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    before = snapshot(fresh)
    with pytest.raises(taillor.AdapterFileError, match=os.path.join(directory, name).replace(".", r"\.")) as info:
        taillor.load_adapter(fresh, directory)
    assert isinstance(info.value, ValueError)
    assert not list(taillor.iter_taillor_layers(fresh)), "nothing may be applied"
    assert_unchanged(fresh, before)
