"""Hugging Face Trainer integration: a callback for any Trainer (the plain one, TRL's SFTTrainer, DPO, ...), a
Trainer that adds the spectral penalty to the loss, a task loop, and a causal-LM collator that keeps padding out of
the loss.

Import explicitly (``from taillor.hf_trainer import TailLoRCallback``): transformers is an optional dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .model import consolidate, iter_taillor_layers, spectral_penalty
from .penalty_hook import attach_penalty


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def penalty_stats(model: nn.Module) -> dict[str, float]:
    """λ over the TailLoR layers (``taillor/lambda_mean``, ``_min``, ``_max``) and the mean share of the update's
    energy in the pre-trained head (``taillor/head_share``, see :meth:`TailLoRLinear.head_share`); {} without
    TailLoR layers. Reads the values to the host: call it when logging, not every step."""
    layers = [layer for _, layer in iter_taillor_layers(_unwrap(model))]
    if not layers:
        return {}
    strengths = torch.stack([layer.penalty_strength.detach().double().cpu() for layer in layers])
    shares = torch.stack([layer.head_share().double().cpu() for layer in layers])
    return {"taillor/lambda_mean": float(strengths.mean()), "taillor/lambda_min": float(strengths.min()),
            "taillor/lambda_max": float(strengths.max()), "taillor/head_share": float(shares.mean())}


class TailLoRCallback(TrainerCallback):
    """TailLoR for any ``transformers.Trainer`` (TRL's trainers included), with no change to the loss.

    * ``attach=True``: on ``on_train_begin`` it attaches the penalty to the trainer's optimizer with
      :func:`taillor.attach_penalty` (∇P added once per optimizer step, after the grad scaler's unscale and after
      gradient clipping: the penalty's gradient is not clipped) and detaches it on ``on_train_end``.
      ``attach=False`` when the loss already carries the penalty (:class:`TailLoRTrainer`).
    * ``consolidate_on_end=True``: ``on_train_end`` ends the task with :func:`taillor.consolidate`, so a task loop
      is one Trainer per task (a new Trainer makes a new optimizer: the old A, B's optimizer state is stale after
      consolidating). Or leave it False and call :meth:`consolidate` (or ``taillor.consolidate``) yourself.
    * Logging: on each log it adds :func:`penalty_stats` (λ mean/min/max over layers, head share) to the logs
      and to ``state.log_history``. Callbacks run in order: a reporting integration (W&B, TensorBoard) that comes
      before this one does not see them; ``trainer.callback_handler.callbacks.insert(0, callback)`` puts it first.
    """

    def __init__(self, attach: bool = True, consolidate_on_end: bool = False):
        self.attach = attach
        self.consolidate_on_end = consolidate_on_end
        self.handle = None
        self.tasks_consolidated = 0

    def _attach(self, model, optimizer) -> None:
        if self.attach and self.handle is None and model is not None and optimizer is not None:
            self.handle = attach_penalty(optimizer, _unwrap(model))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._attach(model, optimizer)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._attach(model, optimizer)  # a trainer that creates its optimizer late

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or "loss" not in logs:  # training logs only
            return
        stats = penalty_stats(model)
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.consolidate_on_end and model is not None:
            self.consolidate(model)

    def consolidate(self, model: nn.Module) -> int:
        """End a task: :func:`taillor.consolidate` on ``model`` (unwrapped); returns the number of layers."""
        self.tasks_consolidated += 1
        return consolidate(_unwrap(model))


class TailLoRTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is task loss + ``taillor.spectral_penalty(model)``, with a
    :class:`TailLoRCallback` (``attach=False``, first in line) for λ and head-share logging. A convenience: the
    plain Trainer with ``callbacks=[TailLoRCallback()]`` trains the same way, except where gradient clipping binds
    (the loss form clips the penalty's gradient with the task's; the callback's does not).

    The penalty enters once per optimizer step whatever the gradient accumulation: the Trainer divides a
    per-micro-batch loss by the accumulation steps unless the loss was already normalized over the whole
    accumulated batch; in that case the penalty is divided here instead.
    """

    def __init__(self, *args, consolidate_on_end: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.callback_handler.callbacks.insert(0, TailLoRCallback(attach=False, consolidate_on_end=consolidate_on_end))

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
