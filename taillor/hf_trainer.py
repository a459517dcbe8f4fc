"""Hugging Face Trainer integration: a Trainer that adds the spectral penalty to the loss, and a task loop.

Import explicitly (``from taillor.hf_trainer import TailLoRTrainer``): transformers is an optional dependency.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

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
                after_task: Optional[Callable[[int, Trainer], None]] = None) -> nn.Module:
    """Continual fine-tuning with the Trainer: for each task, ``make_trainer(model, task).train()``, then
    ``after_task(index, trainer)`` (evaluate, save...), then ``taillor.consolidate(model)``. Returns ``model``."""
    for index, task in enumerate(tasks):
        trainer = make_trainer(model, task)
        trainer.train()
        if after_task is not None:
            after_task(index, trainer)
        consolidate(_unwrap(model))
    return model
