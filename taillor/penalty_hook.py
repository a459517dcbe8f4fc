"""The spectral penalty without a loss change: ``handle = taillor.attach_penalty(optimizer, model)``.

An optimizer step pre-hook adds ∇P, the gradient of :func:`taillor.spectral_penalty` (``model``), to the gradient
of every TailLoR layer's A and B, once per optimizer step, right before the optimizer reads them; the adaptive λ
(``head_share_target``) takes its one dual step per optimizer step in the same call, through the same code path as
the loss form (:meth:`TailLoRLinear.spectral_penalty`). ``handle.remove()`` detaches it. The loss form
(``loss = task_loss + taillor.spectral_penalty(model)``) stays; use one of the two, not both.

Where it sits in a training step:

* gradient accumulation: the hook runs once per ``optimizer.step()``, whatever the number of backward passes
  before it; divide only the task loss by the accumulation steps, as usual.
* AMP's GradScaler: ``scaler.step(optimizer)`` unscales the gradients (unless ``scaler.unscale_`` already did)
  and checks them for inf/NaN before it calls ``optimizer.step()``; the hook runs inside that call, so ∇P is added
  to unscaled gradients and is never multiplied by the loss scale. A step the scaler skips adds nothing.
* gradient clipping (``clip_grad_norm_`` before ``optimizer.step()``, as the Hugging Face Trainer does): the
  penalty's gradient is NOT clipped and does not count in the clipped norm. Clipping tames the noisy task gradient;
  the penalty is a smooth, deterministic pull on A and B, applied in full like decoupled weight decay. Without
  clipping (or while the clip does not bind) the attached form equals the loss form; with a binding clip the loss
  form scales the penalty's gradient down with the task's, the attached form does not.

The hook calls the penalty with gradients enabled and the model as it is: in ``model.train()`` λ adapts, in
``model.eval()`` it does not (as in the loss form).
"""
from __future__ import annotations

import torch
from torch import nn

from .model import iter_taillor_layers, require_taillor_layers, spectral_penalty


class PenaltyHandle:
    """What :func:`attach_penalty` returns: ``remove()`` detaches the penalty (idempotent); ``attached`` says
    whether it is still attached."""

    def __init__(self, hook):
        self._hook = hook

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _inner_optimizer(optimizer):
    """The torch optimizer that actually steps: wrappers (accelerate's AcceleratedOptimizer) hold it as
    ``.optimizer`` and call its ``step()`` (after the grad scaler's unscale), which is where the hook must sit."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def add_penalty_gradient(model: nn.Module) -> None:
    """Add ∇P (P = :func:`taillor.spectral_penalty` of ``model``) to the ``.grad`` of every trainable A and B, in
    place (a parameter without a gradient gets ∇P); one dual step of an adaptive λ in training mode. What the hook
    calls; exposed for training loops that step without a torch optimizer."""
    layers = require_taillor_layers(model, "attach_penalty")
    params = [p for _, layer in layers for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
    if not params:
        return
    with torch.enable_grad():
        penalty = spectral_penalty(model)
        if not penalty.requires_grad:
            return
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))


def attach_penalty(optimizer: torch.optim.Optimizer, model: nn.Module) -> PenaltyHandle:
    """Add the spectral penalty's gradient to the TailLoR layers' A and B once per ``optimizer.step()``.

    ``optimizer``: a torch optimizer (or a wrapper holding one as ``.optimizer``, as accelerate's) that steps every
    trainable A and B of ``model``. ``model``: the model with TailLoR layers (a PEFT model too). ValueError, before
    anything is attached, when the model has no TailLoR layer or the optimizer does not hold some layer's A or B.
    Returns a :class:`PenaltyHandle`; see the module docstring for accumulation, AMP and clipping.
    """
    layers = require_taillor_layers(model, "attach_penalty")
    inner = _inner_optimizer(optimizer)
    if not hasattr(inner, "register_step_pre_hook"):
        raise TypeError(f"attach_penalty needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    missing = [name for name, layer in layers
               if any(p.requires_grad and id(p) not in held for p in (layer.lora_A, layer.lora_B))]
    if missing:
        raise ValueError(f"attach_penalty: the optimizer does not step A and B of {len(missing)} TailLoR layers "
                         f"({missing[:3]}...); create it after taillor.apply_taillor (and after any sharding) "
                         "from the model's trainable parameters")

    def hook(_optimizer, _args, _kwargs):
        if any(True for _ in iter_taillor_layers(model)):  # merge_and_unload may have removed them
            add_penalty_gradient(model)

    return PenaltyHandle(inner.register_step_pre_hook(hook))
