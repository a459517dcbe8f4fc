"""The fine-tuning methods of the causal-LM demo, each on its own copy of the base model.

* ``frozen``         the base model as loaded: never trained, the reference of every plasticity number
* ``taillor-full``   TailLoR, full spectral frame, consolidated after each task
* ``taillor-head``   TailLoR, head frame (top-h triplets only), consolidated after each task
* ``taillor-no-protect`` TailLoR, head frame, ``protect_tasks`` off: the paper's penalty, the pre-trained head only
* ``lora-continued`` PEFT LoRA, one adapter trained across all tasks
* ``lora-merged``    PEFT LoRA, merged into the weights and restarted after each task (TailLoR's consolidation
  without the spectral frame and the penalty)
* ``full-ft``        every weight trains (its own learning rate)
* ``osf``, ``pissa-merged``, ``mica-merged``, ``o-lora``: the peers of :mod:`taillor.demo.peers` (PEFT OSF,
  PiSSA and MiCA LoRA merged and restarted per task, O-LoRA), each at its own learning rate (``LR_GRIDS``)

The adapters share rank, alpha and target modules. TailLoR's head and penalty are :class:`taillor.TailLoRConfig`'s
library defaults unless overridden.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .peers import PEERS, Peer

__all__ = ["METHODS", "DEFAULT_METHODS", "QUICK_METHODS", "LABELS", "COST_ORDER", "LR_GRIDS", "LMMethod"]

DEFAULT_METHODS = ("frozen", "taillor-full", "taillor-head", "lora-continued", "lora-merged", "full-ft")
# `--quick`: the frozen reference, TailLoR at the library defaults (head frame) and both LoRA variants.
QUICK_METHODS = ("frozen", "taillor-head", "lora-continued", "lora-merged")
METHODS = DEFAULT_METHODS + ("taillor-no-protect",) + PEERS
# The order in which the worker processes get the runs. Measured quick-run costs (CPU s, 2026-12-02): TailLoR full
# frame ~160, full fine-tuning ~150, TailLoR head frame ~115, LoRA ~105, frozen ~0; handed out in this order, two
# workers finish within seconds of each other (longest-first would leave one idle for a LoRA run).
# OSF trains full-rank factors: about three times a LoRA run (740 s against 250 s in the full run of 2026-12-03).
COST_ORDER = ("osf", "taillor-full", "taillor-head", "taillor-no-protect", "lora-merged", "full-ft", "pissa-merged",
              "o-lora", "mica-merged", "lora-continued", "frozen")
LABELS = {
    "frozen": "frozen (base model)",
    "taillor-full": "TailLoR (full frame)",
    "taillor-head": "TailLoR (head frame)",
    "taillor-no-protect": "TailLoR (head frame, protect_tasks off)",
    "lora-continued": "LoRA (continued)",
    "lora-merged": "LoRA (merge+restart)",
    "full-ft": "full fine-tuning",
    "osf": "OSF (PEFT)",
    "pissa-merged": "PiSSA (merge+restart)",
    "mica-merged": "MiCA (merge+restart)",
    "o-lora": "O-LoRA",
}

# The learning-rate grid of each method: three rates a factor 3 apart, the same size for every method
# (``taillor demo --model smollm2 --lr-grid``; the chosen rates are LLMSettings' and docs/results-peers.md's).
LR_GRIDS = {
    "taillor-full": (6.7e-4, 2e-3, 6e-3), "taillor-head": (6.7e-4, 2e-3, 6e-3),
    "taillor-no-protect": (6.7e-4, 2e-3, 6e-3),
    "lora-continued": (6.7e-4, 2e-3, 6e-3), "lora-merged": (6.7e-4, 2e-3, 6e-3),
    "full-ft": (1.7e-5, 5e-5, 1.5e-4),
    "osf": (1e-5, 3e-5, 1e-4),  # PEFT's advice for OSF: 1e-5 to 1e-4
    "pissa-merged": (2.2e-4, 6.7e-4, 2e-3),  # PiSSA's factors start at sqrt(σ) scale, not at zero
    "mica-merged": (6.7e-4, 2e-3, 6e-3),
    "o-lora": (6.7e-4, 2e-3, 6e-3),
}


class LMMethod:
    """One method on a deep copy of ``base`` (``frozen`` uses ``base`` itself and never trains).

    ``net`` is the module to train and evaluate (a PeftModel for the LoRA methods; it changes after each task
    for ``lora-merged`` and the peers). ``taillor_overrides`` (e.g. ``{"penalty": 1.0}``) replace TailLoRConfig
    defaults. ``peer_lrs`` maps each peer to its learning rate; ``n_tasks`` sets OSF's preserved-rank schedule.
    """

    def __init__(self, name: str, base: nn.Module, *, rank: int, alpha: float, targets: Sequence[str], lr: float,
                 lr_full: float, seed: int, taillor_overrides: Optional[dict] = None,
                 peer_lrs: Optional[dict] = None, n_tasks: int = 2):
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        self.name, self.seed, self.task = name, seed, 0
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)
        self.lr = lr_full if name == "full-ft" else (peer_lrs or {}).get(name, lr) if name in PEERS else lr
        self.config, self.peer = None, None
        if name == "frozen":
            self.net = base
            return
        torch.manual_seed(10_000 + seed)
        model = copy.deepcopy(base)
        model.train()
        if self.is_taillor:
            import taillor

            options = {"frame": "full" if name == "taillor-full" else "head", **(taillor_overrides or {})}
            if name == "taillor-no-protect":
                options["protect_tasks"] = False
            self.config = taillor.TailLoRConfig(rank=rank, alpha=alpha, target_modules=self.targets, seed=seed,
                                                **options)
            self.net = taillor.apply_taillor(model, self.config)
        elif name.startswith("lora"):
            self.net = self._new_peft(model)
        elif name in PEERS:
            self.peer = Peer(name, model, rank=rank, alpha=alpha, targets=self.targets, n_tasks=n_tasks, seed=seed,
                             task_type="CAUSAL_LM")
            self.net = self.peer.net
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

    def regularizer(self):
        """The extra training-loss term of the method (O-LoRA's), or None."""
        return self.peer.regularizer() if self.peer is not None else None

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
        elif self.peer is not None:
            self.net = self.peer.end_task()

    @torch.no_grad()
    def current_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Float32 copies of the current weight (LoRA merged into a copy) of the named Linear layers; for the
        methods whose layers stay nn.Linear (LoRA, full fine-tuning, frozen)."""
        if self.is_taillor:
            raise ValueError(f"{self.name}: use taillor.spectral_report for TailLoR layers")
        if self.peer is not None:
            net = self.peer.current_net_merged_copy()
        else:
            net = copy.deepcopy(self.net).merge_and_unload() if self.name.startswith("lora") else self.net
        modules = dict(net.named_modules())
        return {name: modules[name].weight.detach().float().clone() for name in names}
