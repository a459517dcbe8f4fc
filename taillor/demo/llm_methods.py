"""The fine-tuning methods of the causal-LM demo, each on its own copy of the base model.

* ``frozen``         the base model as loaded: never trained, the reference of every plasticity number
* ``taillor-full``   TailLoR, full spectral frame, consolidated after each task
* ``taillor-head``   TailLoR, head frame (top-h triplets only), consolidated after each task
* ``lora-continued`` PEFT LoRA, one adapter trained across all tasks
* ``lora-merged``    PEFT LoRA, merged into the weights and restarted after each task (TailLoR's consolidation
  without the spectral frame and the penalty)
* ``full-ft``        every weight trains (its own learning rate)

The adapters share rank, alpha and target modules. TailLoR's head and penalty are :class:`taillor.TailLoRConfig`'s
library defaults unless overridden.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["METHODS", "LABELS", "COST_ORDER", "LMMethod"]

METHODS = ("frozen", "taillor-full", "taillor-head", "lora-continued", "lora-merged", "full-ft")
# The order in which the worker processes get the runs. Measured quick-run costs (CPU s, 2026-12-02): TailLoR full
# frame ~160, full fine-tuning ~150, TailLoR head frame ~115, LoRA ~105, frozen ~0; handed out in this order, two
# workers finish within seconds of each other (longest-first would leave one idle for a LoRA run).
COST_ORDER = ("taillor-full", "taillor-head", "lora-merged", "full-ft", "lora-continued", "frozen")
LABELS = {
    "frozen": "frozen (base model)",
    "taillor-full": "TailLoR (full frame)",
    "taillor-head": "TailLoR (head frame)",
    "lora-continued": "LoRA (continued)",
    "lora-merged": "LoRA (merge+restart)",
    "full-ft": "full fine-tuning",
}


class LMMethod:
    """One method on a deep copy of ``base`` (``frozen`` uses ``base`` itself and never trains).

    ``net`` is the module to train and evaluate (a PeftModel for the LoRA methods; it changes after each task
    for ``lora-merged``). ``taillor_overrides`` (e.g. ``{"penalty": 1.0}``) replace TailLoRConfig defaults.
    """

    def __init__(self, name: str, base: nn.Module, *, rank: int, alpha: float, targets: Sequence[str], lr: float,
                 lr_full: float, seed: int, taillor_overrides: Optional[dict] = None):
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        self.name, self.seed, self.task = name, seed, 0
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)
        self.lr = lr_full if name == "full-ft" else lr
        self.config = None
        if name == "frozen":
            self.net = base
            return
        torch.manual_seed(10_000 + seed)
        model = copy.deepcopy(base)
        model.train()
        if self.is_taillor:
            import taillor

            self.config = taillor.TailLoRConfig(rank=rank, alpha=alpha, target_modules=self.targets,
                                                frame="full" if name == "taillor-full" else "head", seed=seed,
                                                **(taillor_overrides or {}))
            self.net = taillor.apply_taillor(model, self.config)
        elif name.startswith("lora"):
            self.net = self._new_peft(model)
        else:
            model.requires_grad_(True)
            self.net = model

    @property
    def is_taillor(self) -> bool:
        return self.name.startswith("taillor")

    @property
    def trains(self) -> bool:
        return self.name != "frozen"

    def _new_peft(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(20_000 + 97 * self.seed + self.task)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.targets, lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def trainable_parameters(self) -> int:
        if not self.trains:
            return 0
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    def end_task(self, _model: nn.Module) -> None:
        """Between tasks (``train_tasks``'s ``end_task``): TailLoR consolidates, LoRA merge+restart merges."""
        self.task += 1
        if self.is_taillor:
            import taillor

            taillor.consolidate(self.net)
        elif self.name == "lora-merged":
            self.net = self._new_peft(self.net.merge_and_unload())

    @torch.no_grad()
    def current_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Float32 copies of the current weight (LoRA merged into a copy) of the named Linear layers; for the
        methods whose layers stay nn.Linear (LoRA, full fine-tuning, frozen)."""
        if self.is_taillor:
            raise ValueError(f"{self.name}: use taillor.spectral_report for TailLoR layers")
        net = copy.deepcopy(self.net).merge_and_unload() if self.name.startswith("lora") else self.net
        modules = dict(net.named_modules())
        return {name: modules[name].weight.detach().float().clone() for name in names}
