"""Continual fine-tuning with TailLoR and the Hugging Face Trainer.

A BERT classifier (built from a config, or --model-dir for your own checkpoint) learns two text-classification
tasks in sequence with `TailLoRTrainer` (task loss + spectral penalty); `train_tasks` consolidates between them.
Each task gets its own classifier head, trained with its task and frozen after it.

    python examples/continual_trainer.py --tiny --out runs/trainer
"""
from __future__ import annotations

import argparse
import os

import torch
import transformers

import taillor
from taillor.hf_trainer import TailLoRTrainer, train_tasks

VOCAB = 50


class TokenTask(torch.utils.data.Dataset):
    """Task t: is token (t + 3) present in the sequence? A toy, learnable, task-specific rule."""

    def __init__(self, task: int, size: int, length: int = 12):
        g = torch.Generator().manual_seed(10 + task)
        self.ids = torch.randint(5, VOCAB, (size, length), generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)
        marker = task + 3
        self.ids[self.labels == 1, torch.randint(0, length, (1,), generator=g)] = marker
        self.ids[(self.labels == 0)[:, None] & (self.ids == marker)] = 5

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def make_model(args):
    if args.model_dir:
        return transformers.AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=2)
    torch.manual_seed(0)
    width = 32 if args.tiny else 128
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * width, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def accuracy(model, dataset) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=dataset.ids, attention_mask=torch.ones_like(dataset.ids)).logits
    return float((logits.argmax(-1) == dataset.labels).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CI)")
    parser.add_argument("--model-dir", help="a local Hugging Face checkpoint instead of a random BERT")
    parser.add_argument("--out", default="runs/continual-trainer")
    args = parser.parse_args(argv)
    size = 64 if args.tiny else 1024

    model = make_model(args)
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=4, alpha=8, target_modules=["query", "value"]))
    tasks = [TokenTask(t, size) for t in range(2)]
    heads = []

    def make_trainer(model, task):
        # One classifier head per task: a fresh, trainable head; the previous one is kept (frozen) for evaluation.
        model.classifier = torch.nn.Linear(model.config.hidden_size, 2)
        heads.append(model.classifier)
        training = transformers.TrainingArguments(
            output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=16, num_train_epochs=1 if
            args.tiny else 3, learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=10,
            use_cpu=True, disable_tqdm=args.tiny)
        return TailLoRTrainer(model=model, args=training, train_dataset=task)

    def after_task(index, trainer):
        heads[index].requires_grad_(False)
        scores = []
        for seen in range(index + 1):
            model.classifier = heads[seen]
            scores.append(round(accuracy(model, tasks[seen]), 3))
        model.classifier = heads[index]
        print(f"after task {index}: accuracy per task so far {scores}")

    train_tasks(model, tasks, make_trainer, after_task)
    taillor.save_adapter(model, os.path.join(args.out, "adapter"))
    taillor.export_lora(model, os.path.join(args.out, "lora"))
    print(f"saved the adapter and a PEFT LoRA export under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
