"""TailLoR as a PEFT method (tiny random Llama, no download): get_peft_model wraps the same TailLoRLinear as
apply_taillor; save_pretrained / PeftModel.from_pretrained round-trips exactly after two consolidated tasks and keeps
training the same way; merge_and_unload and the LoRA export reproduce the model; unsupported features raise."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import taillor
from conftest import assert_close, assert_matches_oracle, dense_delta

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed")
from taillor.peft_method import TailLoRPeftConfig, UnsupportedPeftFeature  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_config(**options):
    return TailLoRPeftConfig(**{"rank": 2, "alpha": 4, "head": 4, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
                                **options})


def inputs():
    return torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))


def layers(model):
    return [layer for _, layer in taillor.iter_taillor_layers(model)]


def train_steps(model, steps: int = 2):
    """AdamW steps on the language-model loss with the penalty attached; returns the optimizer."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = taillor.attach_penalty(optimizer, model)
    ids = inputs()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()
    return optimizer


def two_tasks(model):
    """Two consolidated tasks and a third one under way (a nonzero current adapter, adapted λ)."""
    for _ in range(2):
        train_steps(model)
        taillor.consolidate(model)
    train_steps(model)
    return model


def test_config_takes_taillor_config_fields_and_converts_in_one_place():
    names = {f.name for f in dataclasses.fields(taillor.TailLoRConfig)}
    assert names <= {f.name for f in dataclasses.fields(TailLoRPeftConfig)}
    config = peft_config(frame="head", penalty=0.5, head_share_target=None)
    assert config.peft_type == "TAILLOR" and config.to_taillor_config() == taillor.TailLoRConfig(
        rank=2, alpha=4, head=4, target_modules=TARGETS, frame="head", penalty=0.5, head_share_target=None)
    with pytest.raises(ValueError, match="rank"):
        peft_config(rank=0)


def test_get_peft_model_wraps_the_same_layer_as_apply_taillor():
    wrapped = peft.get_peft_model(tiny_llama(), peft_config())
    direct = taillor.apply_taillor(tiny_llama(), peft_config().to_taillor_config(), progress=False)
    assert [type(layer) for layer in layers(wrapped)] == [taillor.TailLoRLinear] * 6
    assert [n.removeprefix("base_model.model.") for n, _ in taillor.iter_taillor_layers(wrapped)] == \
        [n for n, _ in taillor.iter_taillor_layers(direct)]
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 12 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        for a, b in zip(layers(wrapped), layers(direct)):
            a.lora_B.normal_(generator=torch.Generator().manual_seed(5))
            b.lora_B.normal_(generator=torch.Generator().manual_seed(5))
        assert torch.equal(wrapped(input_ids=inputs()).logits, direct(input_ids=inputs()).logits)


def test_target_modules_default_to_peft_lora_targets_for_the_model_type():
    config = TailLoRPeftConfig(rank=2, head=4, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(tiny_llama(), config)
    assert {n.rsplit(".", 1)[-1] for n, _ in taillor.iter_taillor_layers(wrapped)} == {"q_proj", "v_proj"}


def test_save_and_from_pretrained_round_trip_exactly_after_two_tasks(tmp_path):
    model = two_tasks(peft.get_peft_model(tiny_llama(), peft_config()))
    model.eval()
    expected = model(input_ids=inputs()).logits
    model.save_pretrained(str(tmp_path))
    saved = sorted(f for f in os.listdir(tmp_path) if f != "README.md")  # PEFT writes a model card too
    assert saved == ["adapter_config.json", "adapter_model.safetensors"], "safetensors only, never pickle"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    loaded.eval()
    assert torch.equal(loaded(input_ids=inputs()).logits, expected)
    for a, b in zip(layers(model), layers(loaded)):
        assert b.tasks_consolidated == a.tasks_consolidated == 2
        for part in ("lora_A", "lora_B", "consolidated_up", "consolidated_down", "penalty_strength"):
            assert torch.equal(getattr(a, part), getattr(b, part)), part
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)
        assert b.lora_A.requires_grad and b.lora_B.requires_grad
    assert float(layers(loaded)[0].penalty_strength) != 1.0, "λ adapted and restored"
    # ready to keep training: the next steps are the same in both (fresh optimizers on both sides)
    train_steps(model)
    train_steps(loaded)
    for a, b in zip(layers(model), layers(loaded)):
        assert_close(b.lora_A.detach(), a.lora_A.detach(), "optimizer step", "A after more training")
        assert_close(b.lora_B.detach(), a.lora_B.detach(), "optimizer step", "B after more training")
    frozen = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # PEFT's default: inference only
    assert not any(p.requires_grad for p in frozen.parameters())


def saved_two_tasks(tmp_path):
    """(model, its logits, weights path, its tensors) of a two-task model saved with save_pretrained in tmp_path."""
    from safetensors.torch import load_file
    model = two_tasks(peft.get_peft_model(tiny_llama(), peft_config()))
    model.eval()
    expected = model(input_ids=inputs()).logits
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    return model, expected, path, load_file(str(path))


def test_from_pretrained_reexpresses_the_adapter_when_the_frame_differs(tmp_path):
    """A and B stored in another frame (another machine's SVD): loading takes the adapter from its layer
    coordinates P, Q instead, within the reload tolerance."""
    from safetensors.torch import save_file
    model, expected, path, tensors = saved_two_tasks(tmp_path)
    tensors = {k: (-v if k.endswith(".lora_A") else v) for k, v in tensors.items()}  # another frame's signs
    save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(loaded(input_ids=inputs()).logits, expected, "reloaded", "logits")
    for a, b in zip(layers(model), layers(loaded)):
        assert_close(b.lora_A, a.lora_A.detach(), "reloaded factors", "A re-expressed")


def test_merge_and_unload_and_lora_export(tmp_path):
    model = two_tasks(peft.get_peft_model(tiny_llama(), peft_config()))
    model.eval()
    expected = model(input_ids=inputs()).logits
    oracle = {name.removeprefix("base_model.model."): layer.pretrained_weight().double()
              + layer.consolidated_up.double() @ layer.consolidated_down.double() + dense_delta(layer)
              for name, layer in taillor.iter_taillor_layers(model)}
    taillor.export_lora(model.get_base_model(), str(tmp_path / "lora"))
    plain = model.merge_and_unload()
    assert isinstance(plain, transformers.LlamaForCausalLM) and not layers(plain)
    for name, weight in oracle.items():
        assert_matches_oracle(plain.get_submodule(name).weight, weight, torch.float32, name)
    assert_close(plain(input_ids=inputs()).logits, expected, "reordered", "merged logits")
    lora = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")).eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    assert_close(lora(input_ids=inputs()).logits, expected, "reloaded", "exported LoRA logits")


def test_unsupported_peft_features_raise_and_change_nothing(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft_config())
    model.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedPeftFeature, match="second adapter"):
        model.add_adapter("other", peft_config())
    with pytest.raises(UnsupportedPeftFeature, match="second adapter"):
        model.load_adapter(str(tmp_path), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    with pytest.raises((UnsupportedPeftFeature, ValueError), match="other|not found"):
        model.set_adapter("other")
    # PEFT's own status check refuses first (its layer status knows only its own layer classes); either way it raises
    with pytest.raises((UnsupportedPeftFeature, ValueError), match="disable_adapter|No adapter layers"):
        with model.disable_adapter():
            pass
    with pytest.raises(UnsupportedPeftFeature, match="delete_adapter"):
        model.delete_adapter("default")
    with pytest.raises(UnsupportedPeftFeature, match="unload"):
        model.unload()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(layers(model)) == 6


def test_loading_onto_a_used_adapter_or_another_model_raises(tmp_path):
    model = two_tasks(peft.get_peft_model(tiny_llama(), peft_config()))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="fresh TailLoR layer"):
        model.load_adapter(str(tmp_path), adapter_name="default")
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        peft.PeftModel.from_pretrained(tiny_llama(seed=1), str(tmp_path))


def test_the_saved_base_sketch_is_checked_and_adapters_saved_without_one_still_load(tmp_path):
    from safetensors.torch import save_file
    _, expected, weights, tensors = saved_two_tasks(tmp_path)
    sketches = [k for k in tensors if k.endswith(".base_sketch")]
    assert len(sketches) == 6 and all(tensors[k].shape == (64,) for k in sketches)
    tensors[sketches[0]] = tensors[sketches[0]] * 1.1  # as if saved on a base that differs by about 10 %
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="sketch differs by 9.09e-02 of its norm"):
        peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    save_file({k: v for k, v in tensors.items() if not k.endswith(".base_sketch")}, str(weights))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # saved before the sketch existed
    loaded.eval()
    assert torch.equal(loaded(input_ids=inputs()).logits, expected)
