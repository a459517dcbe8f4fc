"""Causal-LM training with the Trainer: the collator keeps padding out of the loss, and TailLoRTrainer adds the
spectral penalty exactly once per optimizer step under gradient accumulation (tiny random Llama, no download)."""
from __future__ import annotations

import pytest
import torch

import taillor
from conftest import assert_close, assert_scalar_matches, dense_head_share

transformers = pytest.importorskip("transformers")
from taillor.hf_trainer import CausalLMCollator, TailLoRTrainer, train_tasks  # noqa: E402
from tiny_models import nudge_lora_B, tiny_llama  # noqa: E402

EOS = 2  # also the padding id, as in SmolLM2: real end-of-text tokens must stay in the loss


def examples():
    """Variable-length examples; several contain the end-of-text id (== the padding id) as a real token."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5, 8]
    rows = [torch.randint(3, 40, (n,), generator=g).tolist() for n in lengths]
    rows[0][3] = EOS
    rows[2][-1] = EOS
    return [{"input_ids": r} for r in rows]


def test_collator_masks_padding_by_length_not_by_id():
    batch = CausalLMCollator(pad_token_id=EOS)(examples())
    lengths = [7, 3, 5, 8]
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype == torch.long
    for i, (n, ex) in enumerate(zip(lengths, examples())):
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (8 - n)
        assert batch["labels"][i, :n].tolist() == ex["input_ids"], "real tokens (EOS included) are learned"
        assert batch["labels"][i, n:].eq(-100).all() and batch["input_ids"][i, n:].eq(EOS).all()
    assert CausalLMCollator(EOS, pad_to_multiple_of=16)(examples())["input_ids"].shape == (4, 16)


def test_collator_rejects_empty_input():
    with pytest.raises(ValueError, match="empty batch"):
        CausalLMCollator(EOS)([])
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        CausalLMCollator(EOS)([{"input_ids": [4, 5]}, {"input_ids": []}])


def test_padded_batch_loss_is_the_mean_over_real_tokens_only():
    model = tiny_llama().eval()
    batch = CausalLMCollator(EOS)(examples())
    with torch.no_grad():
        loss = model(**batch).loss
        total, count = 0.0, 0
        for ex in examples():  # each example alone, unpadded: the oracle
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert_close(loss.double(), torch.tensor(total / count, dtype=torch.float64), "reordered", "batch loss")


class Blocks(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _adapted(seed: int = 0):
    model = tiny_llama(seed, eos=EOS)
    config = taillor.TailLoRConfig(rank=2, alpha=4, head=4, penalty=3.0, target_modules=["q_proj", "down_proj"])
    taillor.apply_taillor(model, config, progress=False)
    nudge_lora_B(model, seed=7)
    return model


def _one_step(trainer_cls, tmp_path, batch: int, accumulation: int, model=None) -> dict[str, torch.Tensor]:
    model = _adapted() if model is None else model
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=Blocks(examples()),
                          data_collator=CausalLMCollator(EOS))
    trainer.train()  # one optimizer step over all four examples, however they are split into micro-batches
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_penalty_enters_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    with_penalty = _one_step(TailLoRTrainer, tmp_path / "a", batch=2, accumulation=2)
    task_only = _one_step(transformers.Trainer, tmp_path / "b", batch=2, accumulation=2)
    model = _adapted()
    taillor.spectral_penalty(model).backward()
    start = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    moved = 0.0
    for name in start:
        # SGD, lr 0.1: the two runs differ by exactly one step along the penalty's gradient
        assert_close(with_penalty[name] - task_only[name], -0.1 * grads[name], "optimizer step", name)
        moved = max(moved, float((with_penalty[name] - start[name]).abs().max()))
    assert moved > 1e-3


def test_strength_takes_one_dual_step_per_optimizer_step_with_gradient_accumulation(tmp_path):
    """Each layer's λ after one optimizer step of two micro-batches is the float64 formula applied once, from the
    head share of the update before the step (start λ = 3, target 0.05)."""
    from test_penalty_strength import expected_strength
    model = _adapted()
    expected = {name: expected_strength(3.0, dense_head_share(layer), 0.05, 3.0)
                for name, layer in taillor.iter_taillor_layers(model)}
    _one_step(TailLoRTrainer, tmp_path, batch=2, accumulation=2, model=model)
    for name, layer in taillor.iter_taillor_layers(model):
        assert_scalar_matches(layer.penalty_strength, expected[name], f"{name}: λ")


def test_accumulated_step_equals_the_full_batch_step(tmp_path):
    accumulated = _one_step(TailLoRTrainer, tmp_path / "a", batch=2, accumulation=2)
    full_batch = _one_step(TailLoRTrainer, tmp_path / "b", batch=4, accumulation=1)
    for name in accumulated:
        assert_close(accumulated[name], full_batch[name], "optimizer step", name)


def test_train_tasks_calls_end_task_after_each_task():
    calls = []

    class FakeTrainer:
        def __init__(self, task):
            self.task = task

        def train(self):
            calls.append(("train", self.task))

    model = torch.nn.Linear(2, 2)
    train_tasks(model, ["a", "b"], lambda m, task: FakeTrainer(task),
                after_task=lambda i, trainer: calls.append(("after", i)),
                end_task=lambda m: calls.append(("end", m is model)))
    assert calls == [("train", "a"), ("after", 0), ("end", True), ("train", "b"), ("after", 1), ("end", True)]
    with pytest.raises(ValueError, match="no TailLoRLinear"):  # the default end_task is taillor.consolidate
        train_tasks(model, ["a"], lambda m, task: FakeTrainer(task))
