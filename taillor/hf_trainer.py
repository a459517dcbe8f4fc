"""Hugging Face Trainer integration: a Trainer that adds the spectral penalty to the loss, a task loop, and a
causal-LM collator that keeps padding out of the loss.

Import explicitly (``from taillor.hf_trainer import TailLoRTrainer``): transformers is an optional dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import Trainer

from .model import consolidate, spectral_penalty


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class TailLoRTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is task loss + ``taillor.spectral_penalty(model)``.

    The penalty enters once per optimizer step whatever the gradient accumulation: the Trainer divides a
    per-micro-batch loss by the accumulation steps unless the loss was already normalized over the whole
    accumulated batch; in that case the penalty is divided here instead.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch, **kwargs)
        if model.training:  # evaluation losses stay the task's own
            penalty = spectral_penalty(_unwrap(model))
            if self._loss_already_scaled_for_accumulation(num_items_in_batch):
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_already_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step's test (transformers >= 4.46; `loss_is_scaled_for_ga` in 5.x).
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)


def train_tasks(model: nn.Module, tasks: Iterable, make_trainer: Callable[[nn.Module, object], Trainer],
                after_task: Optional[Callable[[int, Trainer], None]] = None,
                end_task: Optional[Callable[[nn.Module], object]] = consolidate) -> nn.Module:
    """Continual fine-tuning with the Trainer: for each task, ``make_trainer(model, task).train()``, then
    ``after_task(index, trainer)`` (evaluate, save...), then ``end_task(model)``. Returns ``model``.

    ``end_task`` defaults to :func:`taillor.consolidate`; baselines pass their own (a LoRA merge + restart) or
    None (nothing between tasks).
    """
    for index, task in enumerate(tasks):
        trainer = make_trainer(model, task)
        trainer.train()
        if after_task is not None:
            after_task(index, trainer)
        if end_task is not None:
            end_task(_unwrap(model))
    return model


@dataclass(frozen=True)
class CausalLMCollator:
    """Pads causal-LM examples on the right and masks the padding out of the loss.

    Each feature holds ``input_ids`` (a list or 1-D tensor of token ids, length >= 1). Returns int64 tensors
    ``input_ids`` (B, L) padded with ``pad_token_id``, ``attention_mask`` (B, L) (1 on real tokens) and ``labels``
    (B, L): the input ids, -100 on padding. Padding is found from each example's length, never by comparing ids
    with ``pad_token_id``: many tokenizers pad with their end-of-text token, which real text also contains and
    must still be learned. L is the longest example, rounded up to ``pad_to_multiple_of`` if set.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        empty = [i for i, r in enumerate(rows) if r.numel() == 0]
        if empty:
            raise ValueError(f"CausalLMCollator: examples {empty} have no tokens")
        length = max(r.numel() for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :r.numel()] = r
            attention_mask[i, :r.numel()] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
