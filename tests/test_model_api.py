"""Model API on a transformers BERT built from a config: apply, train, consolidate, save/load, export, merge."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_close, assert_matches_oracle

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=24)
    return transformers.BertModel(config).eval()


def bert_inputs():
    return {"input_ids": torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(9)),
            "attention_mask": torch.ones(3, 10, dtype=torch.long)}


def outputs(model):
    with torch.no_grad():
        return model(**bert_inputs()).last_hidden_state


CONFIG = taillor.TailLoRConfig(rank=4, alpha=8, target_modules=["query", "value"], head=4, penalty=1e-2)


def train_steps(model, steps=3, lr=5e-2, seed=0):
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        out = model(**bert_inputs()).last_hidden_state
        loss = out.pow(2).mean() + taillor.spectral_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_apply_matches_original_at_init_and_freezes_the_rest():
    base = tiny_bert()
    ref = outputs(base)
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    assert torch.equal(outputs(model), ref)
    names = [n for n, _ in taillor.iter_taillor_layers(model)]
    assert names == [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    summary = taillor.trainable_parameters(model)
    assert summary.trainable == 4 * (4 * 32 + 32 * 4) and summary.taillor_layers == 4
    assert "trainable%" in str(summary)


def test_target_module_conventions():
    regex = taillor.apply_taillor(tiny_bert(), taillor.TailLoRConfig(rank=2, head=2, target_modules=r".*\.(key|value)"))
    assert len(list(taillor.iter_taillor_layers(regex))) == 4
    every = taillor.apply_taillor(tiny_bert(), taillor.TailLoRConfig(rank=2, head=2, target_modules="all-linear"))
    assert len(list(taillor.iter_taillor_layers(every))) == 2 * 6 + 1  # q,k,v,o,intermediate,output + pooler
    lm = transformers.BertForMaskedLM(tiny_bert().config)
    lm = taillor.apply_taillor(lm, taillor.TailLoRConfig(rank=2, head=2, target_modules="all-linear"))
    names = [n for n, _ in taillor.iter_taillor_layers(lm)]
    assert "cls.predictions.decoder" not in names and "cls.predictions.transform.dense" in names
    excluded = taillor.apply_taillor(tiny_bert(), taillor.TailLoRConfig(
        rank=2, head=2, target_modules="all-linear", exclude_modules=["pooler.dense"]))
    assert "pooler.dense" not in dict(taillor.iter_taillor_layers(excluded))
    with pytest.raises(ValueError, match="already has TailLoRLinear"):
        taillor.apply_taillor(excluded, CONFIG)


@pytest.mark.parametrize("frame", ["full", "head"])
def test_consolidate_save_load_reproduces_after_two_tasks(tmp_path, frame):
    config = taillor.TailLoRConfig(rank=4, alpha=8, target_modules=["query", "value"], head=4, frame=frame)
    model = taillor.apply_taillor(tiny_bert(), config)
    for task in range(2):
        train_steps(model, seed=task)
        before = outputs(model)
        taillor.consolidate(model)
        assert_close(outputs(model), before, "reordered", "consolidate")
    train_steps(model, seed=5)
    trained = outputs(model)
    taillor.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = taillor.load_adapter(tiny_bert(), str(tmp_path))
    assert_close(outputs(loaded), trained, "reloaded", "outputs after load")
    for (_, a), (_, b) in zip(taillor.iter_taillor_layers(model), taillor.iter_taillor_layers(loaded)):
        assert b.tasks_consolidated == 2
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)  # replayed folds are bit-exact
        assert_close(a.lora_A, b.lora_A, "reloaded factors", "lora_A")
    # Training continues from the loaded adapter exactly as from the original.
    train_steps(model, steps=1, seed=7)
    train_steps(loaded, steps=1, seed=7)
    assert_close(outputs(loaded), outputs(model), "reloaded", "a step after load")


def test_export_lora_loads_in_peft_with_same_outputs(tmp_path):
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    train_steps(model, seed=1)
    taillor.consolidate(model)
    train_steps(model, seed=2)
    expected = outputs(model)
    taillor.export_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    served = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    assert_close(outputs(served), expected, "reloaded", "PEFT")


def test_merge_and_unload_leaves_plain_linears_with_same_outputs():
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    train_steps(model)
    expected = outputs(model)
    plain = taillor.merge_and_unload(model)
    assert not list(taillor.iter_taillor_layers(plain))
    assert all(type(m) is not taillor.TailLoRLinear for m in plain.modules())
    assert isinstance(plain.encoder.layer[0].attention.self.query, nn.Linear)
    assert_close(outputs(plain), expected, "reordered", "merge_and_unload")


def test_merge_unmerge_round_trip_on_a_layer():
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(24, 20), rank=3, head=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 24)
    y = layer(x).detach()
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y, "reordered", "merged")
    layer.merge()  # idempotent
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, "weight round trip", "unmerged weight")
    assert_close(layer(x), y, "reordered", "unmerged")
    layer.merge()
    layer.consolidate()
    assert not layer.merged and layer.tasks_consolidated == 1 and torch.count_nonzero(layer.lora_B) == 0
    assert_close(layer(x), y, "reordered", "consolidated")
    assert_close(layer.pretrained_weight(), w0, "weight round trip", "pretrained weight")
    assert_matches_oracle(layer.learned_delta(), (layer.base_layer.weight - w0).double(), torch.float32)


def test_tail_init_zeroes_head_coordinates():
    torch.manual_seed(0)
    full = taillor.TailLoRLinear.from_linear(nn.Linear(24, 20), rank=3, head=4, init="tail")
    assert torch.count_nonzero(full.lora_A[:, :4]) == 0 and torch.count_nonzero(full.lora_A[:, 4:]) > 0
    head = taillor.TailLoRLinear.from_linear(nn.Linear(24, 20), rank=3, head=4, init="tail", frame="head")
    assert (head.lora_A @ head.frame.V).abs().max() < 1e-6


def test_initialisation_is_seeded_per_layer_and_task():
    a = taillor.apply_taillor(tiny_bert(), CONFIG)
    b = taillor.apply_taillor(tiny_bert(), CONFIG)
    la, lb = dict(taillor.iter_taillor_layers(a)), dict(taillor.iter_taillor_layers(b))
    name = "encoder.layer.0.attention.self.query"
    assert torch.equal(la[name].lora_A, lb[name].lora_A)
    assert not torch.equal(la[name].lora_A, la["encoder.layer.1.attention.self.query"].lora_A)
    first = la[name].lora_A.detach().clone()
    taillor.consolidate(a)
    assert not torch.equal(la[name].lora_A, first)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.__setitem__("config", {**d["config"], "rank": 2}), "saved rank 4 differs"),
    (lambda d: d["layers"].pop("encoder.layer.0.attention.self.query"), "adapter layers do not match"),
    (lambda d: d.__setitem__("format", "other"), "not a taillor adapter"),
])
def test_mismatched_adapter_raises_and_leaves_model_untouched(tmp_path, mutate, match):
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    train_steps(model)
    taillor.save_adapter(model, str(tmp_path))
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    mutate(document)
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        taillor.load_adapter(fresh, str(tmp_path))
    assert not list(taillor.iter_taillor_layers(fresh))
    after = snapshot(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_for_another_base_or_shape_is_rejected(tmp_path):
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    taillor.save_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        taillor.load_adapter(tiny_bert(seed=1), str(tmp_path))
    wider = transformers.BertModel(transformers.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=48))
    with pytest.raises(ValueError, match="saved for a 32->32 layer"):
        taillor.load_adapter(wider, str(tmp_path))
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["encoder.layer.0.attention.self.query.lora_P"] = torch.zeros(32, 3)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"lora_P: saved shape \(32, 3\), expected \(32, 4\)"):
        taillor.load_adapter(tiny_bert(), str(tmp_path))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    taillor.save_adapter(model, str(tmp_path))
    original = (tmp_path / "adapter_model.safetensors").read_bytes()
    train_steps(model)
    import safetensors.torch
    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        taillor.save_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_torch_compile_matches_eager():
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    train_steps(model, steps=1)
    expected = outputs(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        got = compiled(**bert_inputs()).last_hidden_state
    assert_close(got, expected, "reordered", "compiled")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """HF's gradient_checkpointing_enable wraps blocks in torch.utils.checkpoint: same gradients either way."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 4))
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=2, target_modules=["0", "2"]))
    for _, layer in taillor.iter_taillor_layers(model):
        nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad] + [x]

    def grads(run):
        for p in params:
            p.grad = None
        run().pow(2).sum().backward()
        return [p.grad.clone() for p in params]

    plain = grads(lambda: model(x))
    checkpointed = grads(lambda: checkpoint(model, x, use_reentrant=use_reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_saved_penalty_strength_round_trips_and_is_checked(tmp_path):
    """Each layer's adapted λ is part of its record: restored on load; an invalid value is rejected up front."""
    model = taillor.apply_taillor(tiny_bert(), CONFIG)
    train_steps(model)
    strengths = {name: float(layer.penalty_strength) for name, layer in taillor.iter_taillor_layers(model)}
    assert any(value != CONFIG.penalty for value in strengths.values())  # the dual steps moved λ
    taillor.save_adapter(model, str(tmp_path))
    loaded = taillor.load_adapter(tiny_bert(), str(tmp_path))
    assert {name: float(layer.penalty_strength) for name, layer in taillor.iter_taillor_layers(loaded)} == strengths
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    document["layers"]["encoder.layer.1.attention.self.value"]["penalty_strength"] = -1.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"encoder.layer.1.attention.self.value: saved penalty_strength -1.0"):
        taillor.load_adapter(fresh, str(tmp_path))
    assert not list(taillor.iter_taillor_layers(fresh))
    assert all(torch.equal(before[k], v) for k, v in snapshot(fresh).items())


def test_layer_record_round_trip_on_one_layer():
    """export_record / check_record / load_record without the file format: the layer's own record."""
    from taillor.layer import check_record
    torch.manual_seed(0)
    linear = nn.Linear(24, 20)
    layer = taillor.TailLoRLinear.from_linear(copy.deepcopy(linear), rank=3, head=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.consolidate()
    with torch.no_grad():
        layer.lora_B.normal_()
    tensors, meta = layer.export_record()
    assert set(tensors) == {"lora_P", "lora_Q", "consolidated_up", "consolidated_down"}
    fresh = taillor.TailLoRLinear.from_linear(copy.deepcopy(linear), rank=3, head=4)
    check_record("layer", fresh.base_layer, tensors, meta, fresh.config)
    fresh.load_record(tensors, meta)
    x = torch.randn(5, 24)
    assert_close(fresh(x), layer(x), "reloaded", "outputs")
    assert torch.equal(fresh.base_layer.weight, layer.base_layer.weight)
    with pytest.raises(ValueError, match=r"layer.lora_Q: saved shape \(20, 2\), expected \(20, 3\)"):
        check_record("layer", fresh.base_layer, {**tensors, "lora_Q": tensors["lora_Q"][:, :2]}, meta, fresh.config)
