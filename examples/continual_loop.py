"""Continual fine-tuning with TailLoR in a plain PyTorch loop.

A Llama-style causal LM (built from a config, or pass --model-dir for your own checkpoint) learns two tasks one
after the other; between them the adapter is consolidated. At the end the adapter is saved, reloaded onto a
fresh base model, and exported as a PEFT LoRA adapter.

    python examples/continual_loop.py --tiny --out runs/loop
"""
from __future__ import annotations

import argparse
import os

import torch
import transformers

import taillor


def make_model(args) -> torch.nn.Module:
    if args.model_dir:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    width, layers = (32, 2) if args.tiny else (128, 4)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def task_batches(task: int, steps: int, batch: int = 8, length: int = 16):
    """Task t: sequences that count up by t + 1 modulo the vocabulary (a toy, learnable rule)."""
    g = torch.Generator().manual_seed(100 + task)
    for _ in range(steps):
        start = torch.randint(0, 64, (batch, 1), generator=g)
        yield (start + (task + 1) * torch.arange(length)) % 64


def task_loss(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CI)")
    parser.add_argument("--model-dir", help="a local Hugging Face causal-LM checkpoint instead of a random one")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="runs/continual-loop")
    args = parser.parse_args(argv)
    steps = args.steps or (10 if args.tiny else 200)

    model = make_model(args)
    config = taillor.TailLoRConfig(rank=4, alpha=8, target_modules="all-linear")
    taillor.apply_taillor(model, config)
    print(taillor.trainable_parameters(model))

    for task in range(2):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for tokens in task_batches(task, steps):
            loss = task_loss(model, tokens) + taillor.spectral_penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            losses = [float(task_loss(model, next(task_batches(t, 1)))) for t in range(task + 1)]
        print(f"after task {task}: loss per task so far {[round(x, 3) for x in losses]}")
        taillor.consolidate(model)  # the next task starts from a fresh adapter; the frame stays pre-trained

    adapter_dir, lora_dir = os.path.join(args.out, "adapter"), os.path.join(args.out, "lora")
    taillor.save_adapter(model, adapter_dir)
    taillor.export_lora(model, lora_dir)
    reloaded = taillor.load_adapter(make_model(args).eval(), adapter_dir)
    probe = next(task_batches(0, 1))
    with torch.no_grad():
        gap = (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max()
    print(f"saved to {adapter_dir}, exported a PEFT LoRA to {lora_dir}; reload max |Δlogits| = {float(gap):.2e}")
    return 0 if gap < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
