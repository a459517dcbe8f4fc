"""A TailLoR model's continual-learning state survives a plain state_dict checkpoint (taillor/task_state.py): the
finished tasks, λ, protect_tasks' bases and what merge() added, in torch.save and safetensors files alike, and a bad
entry is refused with the layer and the value named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import taillor

CONFIG = taillor.TailLoRConfig(rank=4, target_modules=["0", "2"])


def fresh_model(config=CONFIG) -> nn.Module:
    """The same pre-trained model every call (seeded), TailLoR applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 32))
    return taillor.apply_taillor(model, config, progress=False)


def train(model, target: float, steps: int = 15) -> None:
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean() + taillor.spectral_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def two_tasks(config=CONFIG) -> nn.Module:
    """A model one task past a consolidation, the second task half trained."""
    model = fresh_model(config)
    train(model, 0.0)
    taillor.consolidate(model)
    train(model, 1.0, steps=5)
    return model


def inputs() -> torch.Tensor:
    return torch.randn(8, 48, generator=torch.Generator().manual_seed(2))


def assert_same_state(restored, original) -> None:
    for (name, a), (_, b) in zip(taillor.iter_taillor_layers(restored), taillor.iter_taillor_layers(original)):
        assert (a.tasks_consolidated, a.merged) == (b.tasks_consolidated, b.merged), name
        for part in ("consolidated_up", "consolidated_down", "merged_up", "merged_down", "penalty_strength",
                     "protect_U", "protect_V"):
            assert torch.equal(getattr(a, part), getattr(b, part)), (name, part)
    with torch.no_grad():
        assert torch.equal(restored(inputs()), original(inputs()))
    assert torch.equal(taillor.spectral_penalty(restored).detach(), taillor.spectral_penalty(original).detach())


@pytest.mark.parametrize("file", ["torch", "safetensors"])
def test_a_state_dict_checkpoint_keeps_the_finished_tasks(tmp_path, file):
    original = two_tasks()
    assert original[0].tasks_consolidated == 1 and original[0].protect_U.shape[1] > 0
    assert float(original[0].penalty_strength) != CONFIG.penalty  # λ adapted (head_share_target)
    state = original.state_dict()
    if file == "torch":
        torch.save(state, tmp_path / "model.pt")
        state = torch.load(tmp_path / "model.pt", weights_only=True)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
        state = load_file(tmp_path / "model.safetensors")
    restored = fresh_model()
    result = restored.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(restored, original)


def test_an_adapter_saved_after_a_checkpoint_reload_still_holds_every_task(tmp_path):
    """The case a lost task state hides: the restored model's base already holds task 1, so an adapter saved from
    it must still record task 1, or loading it onto the pre-trained base drops what task 1 learned."""
    original = two_tasks()
    restored = fresh_model()
    restored.load_state_dict(original.state_dict())
    taillor.save_adapter(restored, tmp_path / "adapter")
    torch.manual_seed(0)  # the pre-trained model of fresh_model, without TailLoR
    base = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 32))
    reloaded = taillor.load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs()), original(inputs()), rtol=0, atol=1e-6)
    assert reloaded[0].tasks_consolidated == 1


def test_what_merge_added_travels_with_the_merged_weight():
    """Even after an optimizer step taken while merged (A, B no longer what merge() added), the restored model
    unmerges exactly what the original does."""
    original = two_tasks()
    for _, layer in taillor.iter_taillor_layers(original):
        layer.merge()
    train(original, 2.0, steps=2)
    assert not torch.equal(original[0].current_factors()[0], original[0].merged_up)
    restored = fresh_model()
    restored.load_state_dict(original.state_dict())
    assert_same_state(restored, original)
    for (_, a), (_, b) in zip(taillor.iter_taillor_layers(restored), taillor.iter_taillor_layers(original)):
        a.unmerge()
        b.unmerge()
        assert torch.equal(a.weight, b.weight)


def test_a_checkpoint_from_before_the_task_state_loads_as_it_did():
    """state_dicts written before these entries existed hold none of them: they load, strict, and the layer keeps
    the state it has (as loading did then)."""
    state = {k: v for k, v in two_tasks().state_dict().items() if k.split(".")[-1] in (
        "lora_A", "lora_B", "weight", "bias")}
    restored = fresh_model()
    result = restored.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert restored[0].tasks_consolidated == 0 and restored[0].consolidated_up.shape == (40, 0)


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.update({"0.tasks_consolidated": torch.tensor(2)}), r"0: consolidated_up has shape \(40, 4\), "
                                                                    r"expected \(40, 8\)"),
    (lambda s: s.update({"2.tasks_consolidated": torch.tensor(-1)}), r"2: consolidated_up has shape \(32, 4\), "
                                                                     r"expected \(32, -4\).*tasks_consolidated=-1"),
    (lambda s: s.update({"2.merged_up": torch.zeros(32, 3)}),
     r"2: merged_up has shape \(32, 3\), expected \(32, 4\)"),
    (lambda s: s.update({"0.penalty_strength": torch.tensor(float("nan"))}), "0: penalty_strength=nan is not"),
    (lambda s: s.pop("2.merged_down"),
     r"2: the state_dict holds .* of TailLoR's task state but not \['merged_down'\]"),
    (lambda s: s.update({"0.tasks_consolidated": torch.tensor(1.0)}),
     r"0: tasks_consolidated torch.float32 \(\), tasks_folded torch.int64 \(\) and penalty_strength"),
])
def test_a_task_state_that_does_not_fit_is_refused_by_name(mutate, match):
    state = two_tasks().state_dict()
    mutate(state)
    restored = fresh_model()
    before = {k: v.clone() for k, v in restored.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        restored.load_state_dict(state)
    layer = restored[0] if match.startswith("0") else restored[2]
    assert layer.tasks_consolidated == 0 and torch.equal(layer.consolidated_up, before[match[0] + ".consolidated_up"])


def test_a_hugging_face_checkpoint_keeps_the_finished_tasks(tmp_path):
    """save_pretrained (what a Trainer checkpoint writes) keeps the task state, and loading its state dict into a
    fresh TailLoR model, as a resume does, restores it."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama
    config = taillor.TailLoRConfig(rank=2, head=4, target_modules=["q_proj", "v_proj"])
    model = taillor.apply_taillor(tiny_llama(), config, progress=False)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        (model(input_ids=ids, labels=ids).loss + taillor.spectral_penalty(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    taillor.consolidate(model)
    model.save_pretrained(str(tmp_path))
    resumed = taillor.apply_taillor(tiny_llama(), config, progress=False)
    result = resumed.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(taillor.iter_taillor_layers(resumed), taillor.iter_taillor_layers(model)):
        assert a.tasks_consolidated == b.tasks_consolidated == 1, name
        assert torch.equal(a.consolidated_up, b.consolidated_up) and torch.equal(a.protect_V, b.protect_V), name
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=ids).logits, model(input_ids=ids).logits)
