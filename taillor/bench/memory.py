"""The memory suite of ``taillor bench``: host memory of applying TailLoR and of one training step on a Llama-shaped
model built from a transformers config (random weights, nothing downloaded), full vs head frame, float32, bfloat16
or 4-bit (bitsandbytes nf4) base, next to PEFT LoRA (QLoRA on the 4-bit base) at the same rank.

How it is measured: each (shape, base, method) runs in a fresh Python process (``python -m taillor.bench.memory``),
so that no allocation of one case lingers in the next. Memory is the process's resident set from
``/proc/self/status`` (Linux): ``VmRSS`` now and ``VmHWM``, its peak, which writing ``5`` to
``/proc/self/clear_refs`` resets, so a phase's peak is ``VmHWM`` after it minus ``VmRSS`` before it. Before each
phase the heap's free memory goes back to the system (glibc ``malloc_trim``): otherwise memory freed earlier — the
float weights that a 4-bit conversion replaced — is reused by the phase without showing in the resident set. This
counts every byte the process touched; tracemalloc would miss torch's allocations. "Kept" is ``VmRSS`` after the
phase, once the heap's free memory is returned too, minus ``VmRSS`` before it: what the phase left allocated.

The estimate checked against it is :func:`taillor.estimate_apply_memory` (taken before applying, from the layers'
shapes): what applying keeps — the frames, the in-memory frame cache's copies (up to ``TAILLOR_FRAME_CACHE_MB``,
default 1024 MB), A and B — and its peak, while the frames are built (:mod:`taillor.frame.footprint`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

MEMORY_SHAPES = {
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config): 1.24 B parameters, 112 projection matrices.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # A toy shape for --fast (CI): the numbers mean nothing.
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
MEMORY_METHODS = ("taillor-full", "taillor-head", "lora")
MEMORY_BASES = ("fp32", "bf16", "nf4")
RANK = 8
TOKENS = 128


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Return the heap's free memory to the system, then restart VmHWM at VmRSS: memory freed earlier (the float
    weights a 4-bit conversion replaced, say) would otherwise be reused without showing in the resident set."""
    import gc
    from taillor._host_memory import release_freed_host_memory
    gc.collect()
    release_freed_host_memory()  # not glibc: freed memory may then hide part of a phase's allocations
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def llama_model(shape: str, base: str):
    """A LlamaForCausalLM of ``shape`` (random weights, float32; with base="bf16" bfloat16, so TailLoR's frames
    default to bfloat16 too); with base="nf4" the decoder's linear layers are bitsandbytes Linear4bit (nf4, double
    quantization), as QLoRA loads them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=TOKENS, **MEMORY_SHAPES[shape]))
    if base == "bf16":
        model = model.to(torch.bfloat16)
    if base == "nf4":
        import bitsandbytes as bnb
        for name, module in list(model.model.layers.named_modules()):
            if isinstance(module, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                parent, _, child = name.rpartition(".")
                setattr(model.model.layers.get_submodule(parent), child, layer.to("cpu"))
        model.is_loaded_in_4bit = True  # what PEFT reads to wrap bitsandbytes layers
    return model


def probe(shape: str, base: str, method: str) -> dict:
    """One case, in this process: the memory of building, applying and one AdamW training step (bytes)."""
    import torch
    import taillor
    if shape != "toy":  # first run everything once on the toy shape: imports and one-time set-up are not counted
        probe("toy", base, method)
    model = llama_model(shape, base)
    vocab = MEMORY_SHAPES[shape]["vocab_size"]
    tokens = torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    _reset_peak()
    rss_model = _status("VmRSS")
    estimate = None
    if method == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    else:
        config = taillor.TailLoRConfig(rank=RANK, alpha=2 * RANK, target_modules="all-linear",
                                       frame=method.split("-")[1], head=0.25)
        estimate = taillor.estimate_apply_memory(model, config)
        taillor.apply_taillor(model, config, progress=False)
    apply_peak = _status("VmHWM") - rss_model
    _reset_peak()  # what stays allocated, without the heap's free memory
    apply_kept = _status("VmRSS") - rss_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    _reset_peak()
    rss_before_step = _status("VmRSS")
    loss = model(input_ids=tokens, labels=tokens).loss
    if method != "lora":
        loss = loss + taillor.spectral_penalty(model)
    loss.backward()
    optimizer.step()
    step_peak = _status("VmHWM") - rss_before_step
    return {"suite": "memory", "shape": shape, "base": base, "method": method, "model_bytes": rss_model,
            "apply_peak": apply_peak, "apply_kept": apply_kept, "step_peak": step_peak,
            "trainable": sum(p.numel() for p in trainable), "estimate": estimate}


def memory_shapes() -> list[str]:
    """The shapes the memory suite measures by default (the toy one in fast mode; ``--memory-shapes`` adds
    llama-1b, whose nine rows took 29 minutes on two cores)."""
    from .shapes import fast_mode
    return ["toy"] if fast_mode() else ["smollm2-135m"]


def memory_choice(text: str, known, what: str) -> list[str]:
    """A comma-separated subset of ``known``; ValueError naming the unknown entries."""
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise ValueError(f"unknown memory {what} {unknown or text!r}; choose from {list(known)}")
    return chosen


def measure_memory(shape: str, bases=MEMORY_BASES, methods=MEMORY_METHODS, tick=None) -> list[dict]:
    """Rows of the memory suite: one fresh process per (base, method)."""
    rows = []
    for base in bases:
        for method in methods:
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            done = subprocess.run([sys.executable, "-m", "taillor.bench.memory", shape, base, method],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                rows.append({"suite": "memory", "shape": shape, "base": base, "method": method,
                             "skipped": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if tick is not None:
                tick(0)
    return rows


def memory_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, lines) in MiB, with the estimates' errors against the measured kept memory and peak."""
    header = ["shape", "base", "method", "process MiB (model built)", "apply peak MiB", "estimated peak MiB",
              "peak estimate error", "apply kept MiB", "estimated kept MiB", "kept estimate error", "step peak MiB",
              "trainable"]
    lines = []
    for r in rows:
        if r.get("suite") != "memory":
            continue
        if "skipped" in r:
            lines.append([r["shape"], r["base"], r["method"], "skipped: " + r["skipped"]] + [""] * 8)
            continue
        est: Optional[dict] = r["estimate"]
        lines.append([r["shape"], r["base"], r["method"], _mib(r["model_bytes"]),
                      _mib(r["apply_peak"]), _mib(est["peak"]) if est else "—", _error(est, "peak", r["apply_peak"]),
                      _mib(r["apply_kept"]), _mib(est["kept"]) if est else "—", _error(est, "kept", r["apply_kept"]),
                      _mib(r["step_peak"]), f"{r['trainable']:,}"])
    return header, lines


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f}"


def _error(estimate: Optional[dict], key: str, measured: int) -> str:
    if not estimate or measured <= 0:
        return "—"
    return f"{100 * (estimate[key] / measured - 1):+.1f} %"


if __name__ == "__main__":
    print(json.dumps(probe(*sys.argv[1:4])))
