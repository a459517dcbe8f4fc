"""Model API: apply, train, consolidate, save/load, export, merge — on a transformers BERT built from a config where
transformers (and PEFT) are installed, and against float64 oracles on plain PyTorch models, which need neither."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import os

import pytest
import torch
from torch import nn

import taillor
from conftest import assert_close, assert_matches_oracle


def _optional(name: str):
    """The module if it is installed (a broken install still fails the import loudly), else None."""
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


transformers, peft = _optional("transformers"), _optional("peft")
needs_transformers = pytest.mark.skipif(transformers is None,
                                        reason="transformers is not installed (pip install taillor[demo])")
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed (pip install taillor[demo])")


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


def test_saved_files_get_the_mode_a_plain_write_gives(tmp_path):
    """Readable as any file the user writes (umask 022: 0o644), not mkstemp's 0o600; a replaced file keeps its own."""
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    umask = os.umask(0o022)
    try:
        taillor.save_adapter(model, str(tmp_path / "new"))
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "new").iterdir()}
        assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
        os.chmod(tmp_path / "new" / "adapter_model.safetensors", 0o640)
        taillor.save_adapter(model, str(tmp_path / "new"))
        assert (tmp_path / "new" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


@needs_transformers
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


@needs_transformers
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


@needs_transformers
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
        assert_close(a.lora_B, b.lora_B, "reloaded factors", "lora_B")
        assert torch.equal(a.consolidated_up, b.consolidated_up) and torch.equal(a.consolidated_down,
                                                                                 b.consolidated_down)
        assert float(a.penalty_strength) == float(b.penalty_strength)
    # Training continues from the loaded adapter exactly as from the original.
    train_steps(model, steps=1, seed=7)
    train_steps(loaded, steps=1, seed=7)
    assert_close(outputs(loaded), outputs(model), "reloaded", "a step after load")
    if frame == "full":  # as written when "full" was the default and a config could leave its frame unnamed
        document = json.loads((tmp_path / "adapter_config.json").read_text())
        del document["config"]["frame"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(document))
        assert_close(outputs(taillor.load_adapter(tiny_bert(), str(tmp_path))), trained, "reloaded", "old default")


@needs_peft
@needs_transformers
@pytest.mark.parametrize("frame", ["full", "head"])
def test_export_lora_loads_in_peft_with_same_outputs(tmp_path, frame):
    model = taillor.apply_taillor(tiny_bert(), taillor.TailLoRConfig(
        rank=4, alpha=8, target_modules=["query", "value"], head=4, penalty=1e-2, frame=frame))
    train_steps(model, seed=1)
    taillor.consolidate(model)
    train_steps(model, seed=2)
    expected = outputs(model)
    taillor.export_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    served = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    assert_close(outputs(served), expected, "reloaded", "PEFT")


@needs_transformers
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


@needs_transformers
def test_a_step_taken_while_merged_does_not_corrupt_the_base(tmp_path):
    """merge() freezes nothing, so an optimizer may change A and B while the layer is merged: unmerge() still removes
    exactly what merge() added, and consolidate() records the current ΔW with the base to match, so the saved
    adapter reloads onto the pre-trained model."""
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    randomize_adapters(model, seed=3)
    w0 = {name: layer.base_layer.weight.detach().clone() for name, layer in taillor.iter_taillor_layers(model)}
    for _, layer in taillor.iter_taillor_layers(model):
        layer.merge()
    randomize_adapters(model, seed=4)  # what a step taken while merged does to A and B
    for name, layer in taillor.iter_taillor_layers(model):
        layer.unmerge()
        assert_close(layer.base_layer.weight, w0[name], "weight round trip", f"{name} unmerged after a step")
        layer.merge()
    randomize_adapters(model, seed=5)
    with pytest.raises(ValueError, match=r"^0: A or B changed after merge\(\); unmerge\(\) first"):
        taillor.save_adapter(model, str(tmp_path))  # the record would replay merge() with other factors
    assert not os.listdir(tmp_path)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(6))
    taillor.consolidate(model)
    for name, layer in taillor.iter_taillor_layers(model):
        assert_close(layer.pretrained_weight(), w0[name], "weight round trip", f"{name} pre-trained weight")
    taillor.save_adapter(model, str(tmp_path))
    reloaded = taillor.load_adapter(plain_model(), str(tmp_path))
    with torch.no_grad():
        assert_close(reloaded(x), model(x), "reordered", "reloaded after consolidating a merged layer")


def test_a_16bit_base_keeps_the_finished_tasks_unfolded_and_exact(tmp_path):
    """On a bfloat16 weight consolidate does not fold (rounding would distort a small update): the weight stays
    the pre-trained one bit for bit, the forward adds the finished tasks, and save/load, a state_dict checkpoint,
    merge and merge_and_unload all give what a float64 model with every update gives."""
    model = taillor.apply_taillor(plain_model().to(torch.bfloat16), PLAIN_CONFIG, progress=False)
    w0 = {name: layer.base_layer.weight.detach().clone() for name, layer in taillor.iter_taillor_layers(model)}
    assert all(not layer.base.folds_tasks for _, layer in taillor.iter_taillor_layers(model))
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)

    def oracle():
        """The float64 model: each pre-trained weight plus everything its layer learned."""
        h = x.double()
        for i, module in enumerate(model):
            if isinstance(module, taillor.TailLoRLinear):
                weight = w0[str(i)].double() + module.learned_delta().double()
                h = h @ weight.t() + module.base_layer.bias.double()
            else:
                h = module(h)
        return h

    for seed in (3, 4):
        randomize_adapters(model, seed=seed)
        for _, layer in taillor.iter_taillor_layers(model):
            with torch.no_grad():
                layer.lora_B.mul_(0.01 * layer.weight.float().norm() / layer.delta_weight().norm())
        taillor.consolidate(model)
    randomize_adapters(model, seed=5)
    want = oracle()
    for name, layer in taillor.iter_taillor_layers(model):
        assert torch.equal(layer.base_layer.weight, w0[name]) and layer.tasks_consolidated == 2
        assert torch.equal(layer.pretrained_weight(), w0[name].float())
    with torch.no_grad():
        assert_matches_oracle(model(x), want, torch.bfloat16, "two unfolded tasks and the adapter")
        expected = model(x)
        taillor.save_adapter(model, str(tmp_path))
        reloaded = taillor.load_adapter(plain_model().to(torch.bfloat16), str(tmp_path))
        assert_matches_oracle(reloaded(x), want, torch.bfloat16, "reloaded")
        resumed = taillor.apply_taillor(plain_model().to(torch.bfloat16), PLAIN_CONFIG, progress=False)
        resumed.load_state_dict(model.state_dict())
        assert torch.equal(resumed(x), expected) and not resumed[0].base.folds_tasks
        model[0].merge()  # the merged weight holds the finished tasks too
        assert_matches_oracle(model(x), want, torch.bfloat16, "merged")
        model[0].unmerge()
        plain = taillor.merge_and_unload(model)
        assert_matches_oracle(plain(x), want, torch.bfloat16, "merge_and_unload")


def test_merged_forward_casts_the_input_as_the_unmerged_one_does():
    layer = taillor.TailLoRLinear.from_linear(nn.Linear(24, 20), rank=3, head=4)
    x = torch.randn(5, 24).to(torch.bfloat16)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    assert merged.dtype == unmerged.dtype == torch.float32
    assert_close(merged, unmerged, "reordered", "merged vs unmerged on a bfloat16 input")


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


@needs_transformers
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


@needs_transformers
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
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    del document["weights_sha256"]  # a hand-edited file, as an adapter saved before the digest existed reads
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"lora_P: saved shape \(32, 3\), expected \(32, 4\)"):
        taillor.load_adapter(tiny_bert(), str(tmp_path))


def test_a_base_that_already_holds_the_update_is_rejected(tmp_path):
    """A base that merely holds an update (a merged model) has almost the norm of the pre-trained one: TailLoR keeps
    ΔW nearly orthogonal to W. The sketch tells them apart, so the updates are not applied twice."""
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    for seed in (3, 4):  # two tasks, each ‖ΔW‖ about 2 % of ‖W‖
        randomize_adapters(model, seed=seed)
        for _, layer in taillor.iter_taillor_layers(model):
            with torch.no_grad():
                layer.lora_B.mul_(0.02 * layer.weight.norm() / layer.delta_weight().norm())
        if seed == 3:
            taillor.consolidate(model)
    taillor.save_adapter(model, str(tmp_path))
    merged = taillor.merge_and_unload(model)
    # The message is the sketch's: the norm check, which runs first, accepted this base.
    with pytest.raises(ValueError, match=r"^0: this base weight is not the one the adapter was trained on \(its "
                                         r"sketch differs by"):
        taillor.load_adapter(merged, str(tmp_path))
    assert not list(taillor.iter_taillor_layers(merged))  # nothing changed


def test_the_base_check_accepts_a_half_precision_copy_and_adapters_saved_before_the_sketch(tmp_path):
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    randomize_adapters(model, seed=3)
    taillor.save_adapter(model, str(tmp_path))
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(7))
    half = taillor.load_adapter(plain_model().to(torch.bfloat16), str(tmp_path))
    with torch.no_grad():
        assert_matches_oracle(half(x.bfloat16()), model(x).double(), torch.bfloat16, "adapter on a bfloat16 copy")
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    for meta in document["layers"].values():
        del meta["base_sketch"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    old = taillor.load_adapter(plain_model(), str(tmp_path))
    with torch.no_grad():
        assert_close(old(x), model(x), "reordered", "adapter saved without a sketch")
    document["layers"]["0"]["base_sketch"] = [1.0, "x"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="0: saved base_sketch is not 64 finite numbers"):
        taillor.load_adapter(plain_model(), str(tmp_path))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    taillor.save_adapter(model, str(tmp_path))
    original = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=1)
    from taillor import _files

    def broken(fd):
        raise OSError("disk full")
    with monkeypatch.context() as patch:  # the new file is written, then the disk fails before the rename
        patch.setattr(_files.os, "fsync", broken)
        with pytest.raises(OSError, match="disk full"):
            taillor.save_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_cut_off_between_its_two_files_is_detected(tmp_path, monkeypatch):
    """The weights are written first, the config last; a config that does not name the weights beside it (a save
    cut off in between) is refused by name instead of mixing one save's meta with another's tensors."""
    from taillor import io as adapter_io
    model = taillor.apply_taillor(plain_model(), PLAIN_CONFIG, progress=False)
    taillor.save_adapter(model, str(tmp_path))
    randomize_adapters(model, seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(adapter_io, "atomic_save_json", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            taillor.save_adapter(model, str(tmp_path))
    with pytest.raises(adapter_io.AdapterFileError, match="adapter_model.safetensors is not the weights file .*"
                                                          "adapter_config.json was saved with"):
        taillor.load_adapter(plain_model(), str(tmp_path))
    taillor.save_adapter(model, str(tmp_path))  # saving again mends it
    reloaded = taillor.load_adapter(plain_model(), str(tmp_path))
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert_close(reloaded(x), model(x), "reloaded", "after saving again")


@needs_transformers
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


@needs_transformers
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
    from taillor.record import check_record
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


# ---------------------------------------------------------------------------------------------------------------
# float64 oracles on a plain PyTorch model (no optional package): the merged and consolidated weight, save/load of
# every saved tensor, the PEFT export's factors
# ---------------------------------------------------------------------------------------------------------------
PLAIN_CONFIG = taillor.TailLoRConfig(rank=3, alpha=6, target_modules=["0", "2"], head=4, penalty=0.5)


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 28))


def randomize_adapters(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in taillor.iter_taillor_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen, dtype=layer.lora_A.dtype))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=gen, dtype=layer.lora_B.dtype))


def oracle_delta(layer) -> torch.Tensor:
    """s·U B A Vᵀ (full frame) or s·B A (head frame) in float64 from the layer's frame and factors, captured now."""
    A, B, s = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.config.scaling
    if layer.config.frame == "full":
        return s * layer.frame.U.double() @ B @ A @ layer.frame.V.double().t()
    return s * B @ A


def train_tasks_by_hand(model, tasks: int) -> tuple[dict, dict, dict]:
    """``tasks`` finished tasks (random A, B, then consolidate) and a current adapter; returns float64 oracles from
    the frames and factors captured before each consolidate: (W₀, W₀ + Σ finished tasks, Σ of every task including
    the current one), by layer name."""
    layers = dict(taillor.iter_taillor_layers(model))
    pretrained = {name: layer.base_layer.weight.detach().double().clone() for name, layer in layers.items()}
    finished = {name: torch.zeros_like(w) for name, w in pretrained.items()}
    for task in range(tasks):
        randomize_adapters(model, seed=10 + task)
        for name, layer in layers.items():
            finished[name] += oracle_delta(layer)
        taillor.consolidate(model)
    randomize_adapters(model, seed=99)
    base = {name: pretrained[name] + finished[name] for name in layers}
    learned = {name: finished[name] + oracle_delta(layer) for name, layer in layers.items()}
    return pretrained, base, learned


def linear_oracle(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """:func:`plain_model`'s output in float64 with weights ``weights["0"]``, ``weights["2"]`` (its own biases)."""
    biases = {name: module.bias.detach().double() for name, module in plain_model().named_children()
              if isinstance(module, nn.Linear)}
    hidden = torch.tanh(x.double() @ weights["0"].t() + biases["0"])
    return hidden @ weights["2"].t() + biases["2"]


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("tasks", [2, 3])
def test_consolidated_and_merged_weight_is_the_float64_sum_of_every_task(frame, tasks):
    """After ``tasks`` consolidations the base weight is W₀ + Σ_tasks s·U B A Vᵀ (s·B A in the head frame), the
    learned update adds the current adapter, merging puts that into the weight, and the outputs are the oracle's."""
    model = taillor.apply_taillor(plain_model(), dataclasses.replace(PLAIN_CONFIG, frame=frame), progress=False)
    pretrained, base, learned = train_tasks_by_hand(model, tasks)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
    merged_oracle = {name: pretrained[name] + learned[name] for name in learned}
    for name, layer in taillor.iter_taillor_layers(model):
        assert layer.tasks_consolidated == tasks
        assert_matches_oracle(layer.base_layer.weight, base[name], torch.float32, f"{name}: consolidated weight")
        assert_matches_oracle(layer.learned_delta(), learned[name], torch.float32, f"{name}: learned update")
    assert_matches_oracle(model(x), linear_oracle(merged_oracle, x), torch.float32, "outputs")
    for name, layer in taillor.iter_taillor_layers(model):
        layer.merge()
        assert_matches_oracle(layer.base_layer.weight, merged_oracle[name], torch.float32, f"{name}: merged weight")
    plain = taillor.merge_and_unload(model)
    assert all(type(module) is not taillor.TailLoRLinear for module in plain.modules())
    assert_matches_oracle(plain(x), linear_oracle(merged_oracle, x), torch.float32, "merged and unloaded")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_save_load_restores_every_saved_tensor(tmp_path, frame):
    """Every tensor of the saved record against its float64 oracle (s·Q Pᵀ is the current update, up·down the
    finished tasks), and every restored tensor against the saved model's: A, B, both consolidated parts, λ, the
    base weight with the finished tasks replayed."""
    from safetensors.torch import load_file
    config = dataclasses.replace(PLAIN_CONFIG, frame=frame)
    model = taillor.apply_taillor(plain_model(), config, progress=False)
    _, base, learned = train_tasks_by_hand(model, 2)
    for index, (_, layer) in enumerate(taillor.iter_taillor_layers(model)):
        layer.penalty_strength.fill_(0.25 + index)  # adapted λ: a value per layer
    taillor.save_adapter(model, str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    loaded = taillor.load_adapter(plain_model(), str(tmp_path))
    for (name, a), (name_b, b) in zip(taillor.iter_taillor_layers(model), taillor.iter_taillor_layers(loaded)):
        assert name == name_b and b.tasks_consolidated == 2 and b.config.frame == frame
        current = oracle_delta(a)
        P, Q = saved[f"{name}.lora_P"].double(), saved[f"{name}.lora_Q"].double()
        assert_matches_oracle(config.scaling * Q @ P.t(), current, torch.float32, f"{name}: saved s·Q Pᵀ")
        up, down = saved[f"{name}.consolidated_up"].double(), saved[f"{name}.consolidated_down"].double()
        assert_matches_oracle(up @ down, learned[name] - current, torch.float32, f"{name}: saved up·down")
        assert_close(b.lora_A, a.lora_A, "reloaded factors", f"{name}.lora_A")
        assert_close(b.lora_B, a.lora_B, "reloaded factors", f"{name}.lora_B")
        assert torch.equal(b.consolidated_up, a.consolidated_up), f"{name}.consolidated_up"
        assert torch.equal(b.consolidated_down, a.consolidated_down), f"{name}.consolidated_down"
        assert float(b.penalty_strength) == float(a.penalty_strength), f"{name}.penalty_strength"
        assert torch.equal(b.base_layer.weight, a.base_layer.weight), f"{name}: replayed folds are bit-exact"
        assert_matches_oracle(b.base_layer.weight, base[name], torch.float32, f"{name}: reloaded base weight")
        assert_matches_oracle(b.delta_weight(), current, torch.float32, f"{name}: reloaded update")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_export_lora_factors_are_the_learned_update(tmp_path, frame):
    """The exported PEFT LoRA (scale lora_alpha / r = 1) holds B·A = everything learned, float64 oracle; with PEFT
    installed (a dev dependency, so CI runs it) the export also loads onto the plain base with the same outputs."""
    from safetensors.torch import load_file
    model = taillor.apply_taillor(plain_model(), dataclasses.replace(PLAIN_CONFIG, frame=frame), progress=False)
    pretrained, _, learned = train_tasks_by_hand(model, 2)
    taillor.export_lora(model, str(tmp_path))
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["r"] == document["lora_alpha"] == 9 and document["target_modules"] == ["0", "2"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, layer in taillor.iter_taillor_layers(model):
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        assert A.shape == (9, layer.in_features) and B.shape == (layer.out_features, 9)
        assert_matches_oracle(B @ A, learned[name], torch.float32, f"{name}: exported B·A")
    if peft is None:
        return
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
    served = peft.PeftModel.from_pretrained(plain_model(), str(tmp_path)).eval()
    with torch.no_grad():
        got = served(x)
    assert_matches_oracle(got, linear_oracle({n: pretrained[n] + learned[n] for n in learned}, x), torch.float32,
                          "PEFT outputs")
