"""protect_tasks: the finished tasks' left and right subspaces join the protected directions.

The penalty and its gradients against the float64 dense formula λ·(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖² + μ·(‖Q_Uᵀ ΔW‖² +
‖ΔW Q_V‖²)) with ΔW materialized and Q_U, Q_V the QR bases of the stacked consolidated factors, in eager and in
the Triton interpreter, both frames; the adapted strength's share counts both terms; the state survives save/load
and further consolidations; the config round-trips and older adapters load.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_close, assert_matches_oracle, assert_penalty_matches_oracle
from taillor.strength import HEAD_SHARE_GAIN


def make_layer(frame, protect=True, weight=0.7, target=None, tasks=2, seed=1, d_in=40, d_out=56):
    """A layer with ``tasks`` finished tasks (random updates consolidated) and a random current adapter."""
    torch.manual_seed(seed)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(d_in, d_out), rank=3, head=6, frame=frame, penalty=0.4,
                                              head_share_target=target, protect_tasks=protect,
                                              protect_tasks_weight=weight, penalty_weighting="sigma")
    for _ in range(tasks + 1):
        if layer.tasks_consolidated == tasks:
            break
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_A.normal_()
        layer.consolidate()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    return layer


def task_bases(layer):
    """Float64 orthonormal bases (QR) of the finished tasks' left and right subspaces, in layer coordinates."""
    up, down = layer.consolidated_up.double(), layer.consolidated_down.double()
    return torch.linalg.qr(up)[0], torch.linalg.qr(down.t())[0]


def dense_protected_penalty(layer, A, B, strength):
    """λ·(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖² + μ·(‖Q_Uᵀ ΔW‖² + ‖ΔW Q_V‖²)), ΔW materialized in float64 from A, B."""
    U, V = layer.frame.U.double(), layer.frame.V.double()
    s = layer.scaling
    delta = s * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)
    omega = layer.frame.omega2.double().sqrt()
    head = (((U * omega).t() @ delta).pow(2).sum() + (delta @ (V * omega)).pow(2).sum())
    Q_U, Q_V = task_bases(layer)
    tasks = (Q_U.t() @ delta).pow(2).sum() + (delta @ Q_V).pow(2).sum()
    return strength * (head + layer.config.protect_tasks_weight * tasks), head, tasks, delta.pow(2).sum()


def check_against_oracle(layer, backend="eager"):
    with taillor.use_backend(backend):
        layer.zero_grad(set_to_none=True)
        value = layer.spectral_penalty()
        value.backward()
    strength = layer.config.penalty
    assert_penalty_matches_oracle(layer, value, lambda A, B: dense_protected_penalty(layer, A, B, strength)[0])


@pytest.mark.parametrize("frame", ["full", "head"])
def test_penalty_and_gradients_match_the_dense_formula(frame):
    layer = make_layer(frame)
    assert layer.protects_tasks and layer.protect_U.shape[1] == 2 * layer.config.rank
    check_against_oracle(layer)


@pytest.mark.parametrize("frame", ["full", "head"])
def test_triton_interpreter_penalty_matches_the_dense_formula(interpreter, frame):
    check_against_oracle(make_layer(frame), backend="triton")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_the_task_term_is_not_zero_and_grows_with_its_weight(frame):
    layer = make_layer(frame)
    _, head, tasks, _ = dense_protected_penalty(layer, layer.lora_A.detach().double(), layer.lora_B.detach().double(),
                                                1.0)
    assert float(tasks) > 0.1 * float(head)  # the term the tests above compare is not negligible
    heavy = make_layer(frame, weight=3.0)
    light = make_layer(frame, weight=0.0)
    values = [float(layer.spectral_penalty().detach()) for layer in (heavy, make_layer(frame), light)]
    assert values[0] > values[1] > values[2]


@pytest.mark.parametrize("frame", ["full", "head"])
def test_the_adapted_share_counts_both_terms(frame):
    layer = make_layer(frame, target=0.05)
    _, head, tasks, total = dense_protected_penalty(layer, layer.lora_A.detach().double(),
                                                    layer.lora_B.detach().double(), 1.0)
    share = (head + layer.config.protect_tasks_weight * tasks) / (2 * total)
    expected = 0.4 * math.exp(HEAD_SHARE_GAIN * max(-2.0, min(2.0, math.log(float(share) / 0.05))))
    layer.spectral_penalty()  # training mode: one dual step from λ = 0.4
    assert_matches_oracle(layer.penalty_strength, torch.tensor(expected, dtype=torch.float64), torch.float32, "λ")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_off_or_zero_weight_is_the_papers_penalty_bit_for_bit(frame):
    for layer in (make_layer(frame, protect=False), make_layer(frame, weight=0.0)):
        U, V = layer.frame_mode.penalty_frame(layer.frame)
        reference = taillor.functional.spectral_penalty(layer.lora_A, layer.lora_B, U, V, layer.frame.omega2,
                                                        layer.config.penalty * layer.scaling ** 2)
        assert torch.equal(layer.spectral_penalty(), reference)
    assert make_layer(frame, protect=False).protect_U.shape[1] == 0  # nothing derived or kept


def test_a_zero_update_adds_no_directions():
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(20, 24), rank=2, head=4, frame="head", protect_tasks=True)
    layer.consolidate()  # B = 0: nothing was learned
    assert layer.protect_U.shape[1] == 0 and not layer.protects_tasks
    with torch.no_grad():
        layer.lora_B[:, 0] = 1.0  # a rank-1 update: one direction on each side
    layer.consolidate()
    assert layer.protect_U.shape[1] == 1 and layer.protect_V.shape[1] == 1


# ---------------------------------------------------------------------------------------------------------------
# saved and loaded with the adapter
# ---------------------------------------------------------------------------------------------------------------
def small_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 20))


def randomize(model):
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_A.normal_()


@pytest.mark.parametrize("frame", ["full", "head"])
def test_state_survives_save_load_and_a_further_consolidation(frame, tmp_path):
    base = small_model()
    fresh = copy.deepcopy(base)
    config = taillor.TailLoRConfig(rank=2, head=4, frame=frame, target_modules=["0", "2"], protect_tasks=True,
                                   protect_tasks_weight=0.5, head_share_target=None, penalty=0.3)
    model = taillor.apply_taillor(base, config, progress=False)
    for _ in range(2):
        randomize(model)
        taillor.consolidate(model)
    randomize(model)
    taillor.save_adapter(model, str(tmp_path))
    loaded = taillor.load_adapter(fresh, str(tmp_path))
    pairs = [(a, b) for (_, a), (_, b) in zip(taillor.iter_taillor_layers(model), taillor.iter_taillor_layers(loaded))]
    for a, b in pairs:  # the loaded layer reproduces the saved layer's penalty (oracle from the saved layer)
        assert b.protect_U.shape == a.protect_U.shape == (a.lora_B.shape[0], 2 * config.rank)
        oracle = dense_protected_penalty(a, a.lora_A.detach().double(), a.lora_B.detach().double(), 0.3)[0]
        assert_matches_oracle(b.spectral_penalty().detach(), oracle, torch.float32, "reloaded penalty")
    taillor.consolidate(model)  # the third task ends on both
    taillor.consolidate(loaded)
    randomize(model)
    for a, b in pairs:
        with torch.no_grad():
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
        assert a.protect_U.shape[1] == b.protect_U.shape[1] == 3 * config.rank
        check_against_oracle(b)
        oracle = dense_protected_penalty(a, a.lora_A.detach().double(), a.lora_B.detach().double(), 0.3)[0]
        assert_matches_oracle(b.spectral_penalty().detach(), oracle, torch.float32, "after a third task")


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
def test_config_round_trip_validation_and_older_adapters(tmp_path):
    config = taillor.TailLoRConfig(rank=2, head=4, target_modules=["0"], protect_tasks=True, protect_tasks_weight=2.5)
    again = taillor.TailLoRConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.protect_tasks and again.protect_tasks_weight == 2.5
    older = config.to_dict()
    del older["protect_tasks"], older["protect_tasks_weight"]
    restored = taillor.TailLoRConfig.from_dict(older)
    assert restored.protect_tasks is False and restored.protect_tasks_weight == 1.0
    with pytest.raises(TypeError, match="protect_tasks"):
        taillor.TailLoRConfig(protect_tasks=1)
    with pytest.raises(ValueError, match="protect_tasks_weight"):
        taillor.TailLoRConfig(protect_tasks_weight=-0.1)
    with pytest.raises(ValueError, match="protect_tasks_weight"):
        taillor.TailLoRConfig(protect_tasks_weight=float("inf"))
    # an adapter saved before the fields existed (its config has neither key) still loads
    base = small_model()
    fresh = copy.deepcopy(base)
    model = taillor.apply_taillor(base, taillor.TailLoRConfig(rank=2, head=4, target_modules=["0", "2"]),
                                  progress=False)
    randomize(model)
    taillor.consolidate(model)
    taillor.save_adapter(model, str(tmp_path))
    path = os.path.join(str(tmp_path), "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    del document["config"]["protect_tasks"], document["config"]["protect_tasks_weight"]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    loaded = taillor.load_adapter(fresh, str(tmp_path))
    x = torch.randn(3, 24)
    assert_close(loaded(x), model(x), "reloaded")
    assert all(not layer.protects_tasks for _, layer in taillor.iter_taillor_layers(loaded))


def test_a_consolidated_model_evaluated_and_stepped_can_be_deep_copied():
    # Factors cached under no_grad used to be views of A: after an in-place optimizer step, deepcopy failed.
    model = taillor.apply_taillor(small_model(), taillor.TailLoRConfig(rank=2, head=4, frame="head",
                                                                       target_modules=["0", "2"]), progress=False)
    randomize(model)
    taillor.consolidate(model)
    with torch.no_grad():
        model(torch.randn(2, 24))
        randomize(model)
    copied = copy.deepcopy(model)
    x = torch.randn(3, 24)
    assert torch.equal(copied(x), model(x))


def test_on_by_default_and_the_demo_command_line_switches_it():
    from taillor.demo.run import build_parser, settings_from_args
    assert taillor.TailLoRConfig().protect_tasks
    settings = settings_from_args(build_parser().parse_args(["--quick", "--protect-tasks-weight", "2"]))
    config = settings.taillor_config("head", 0)
    assert config.protect_tasks and config.protect_tasks_weight == 2.0
    off = settings_from_args(build_parser().parse_args(["--quick", "--no-protect-tasks"]))
    assert not off.taillor_config("full", 0).protect_tasks
    with pytest.raises(ValueError, match="protect_tasks_weight"):
        settings_from_args(build_parser().parse_args(["--protect-tasks-weight", "-1"]))
