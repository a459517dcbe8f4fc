"""The continual fine-tuning methods practitioners would pick instead of TailLoR, set up as their library or
paper defines them, for both demos (:mod:`taillor.demo.methods`, :mod:`taillor.demo.llm_methods`).

* ``osf``          PEFT's Orthogonal Subspace Fine-tuning (``peft.OSFConfig``; Nayak et al. 2025). Each task
  re-wraps the current weights: an SVD splits every target weight into a frozen top-k part (the preserved
  subspace) and a trainable rest whose gradients are projected orthogonal to it; after the task the update is
  merged (``merge_and_unload``). The preserved rank grows from task to task as PEFT's documentation advises for
  a known sequence of n tasks (freeze 1/n, 2/n, ... of the capacity), counting the pre-trained model as the
  first of n + 1 tasks: task t (0-based) of n preserves ``(t + 1) / (n + 1)`` of ``min(d_out, d_in)`` (PEFT
  requires a positive preserved rank, and the pre-trained skill is what the demos' retention probes measure).
* ``pissa-merged`` PEFT LoRA with ``init_lora_weights="pissa"`` (Meng et al. 2024): the adapter starts on the
  top-r singular triplets, the base keeps the residual; merged and restarted (a fresh PiSSA split of the merged
  weight) after each task.
* ``mica-merged``  PEFT LoRA with ``init_lora_weights="mica"``: B frozen on the bottom-r left singular vectors,
  A (zero at start) trains; merged and restarted after each task.
* ``o-lora``       O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
  Learning"): a fresh LoRA per task, earlier tasks' adapters frozen (here merged: the same function), and the
  loss ``λ1 Σ_{i<t} Σ_{j,k} (A_i A_tᵀ)_{jk}² + λ2 Σ ‖θ_t‖₂`` on the LoRA down-projections A (r × d_in), summed
  over layers. No library ships it; :func:`olora_orthogonality` is the paper's term.

Every LoRA-based peer shares the demos' rank, alpha and target modules.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["PEERS", "OLORA_LAMBDA_ORTH", "OLORA_LAMBDA_L2", "osf_preserved_fraction", "olora_orthogonality",
           "lora_down_projections", "Peer", "regularized_trainer_class"]

PEERS = ("osf", "pissa-merged", "mica-merged", "o-lora")
_LORA_INIT = {"pissa-merged": "pissa", "mica-merged": "mica", "o-lora": True}

# O-LoRA's weights: λ1 = 0.5, λ2 = 0, the values of the authors' released training scripts (and of the TRACE
# benchmark's O-LoRA baseline); λ2 = 0 switches the L2 term on the new adapter off, as they run it.
OLORA_LAMBDA_ORTH = 0.5
OLORA_LAMBDA_L2 = 0.0


def osf_preserved_fraction(task: int, n_tasks: int) -> float:
    """OSF's preserved share of ``min(d_out, d_in)`` for 0-based ``task`` of ``n_tasks``: ``(task+1)/(n_tasks+1)``
    (PEFT's progressive budget, the pre-trained model counted as the first task)."""
    if n_tasks < 1 or not 0 <= task < n_tasks:
        raise ValueError(f"osf: task {task} of {n_tasks} tasks is out of range")
    return (task + 1) / (n_tasks + 1)


def olora_orthogonality(previous: Sequence[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    """O-LoRA's orthogonality term of one layer: ``Σ_i Σ_{j,k} (A_i A_tᵀ)_{jk}²``.

    ``previous``: the earlier tasks' down-projections A_i, each (r_i, d_in) and detached; ``current``: A_t,
    (r, d_in), the trainable one. Returns a 0-dim tensor in ``current``'s dtype (zero without earlier tasks)."""
    if not previous:
        return current.new_zeros(())
    stacked = torch.cat([p.to(current.dtype) for p in previous], dim=0)  # (Σ r_i, d_in)
    return (stacked @ current.t()).pow(2).sum()


def lora_down_projections(net: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """The LoRA down-projection weight A (r, d_in) of every LoRA layer of a PEFT model, by layer name (the
    name without PEFT's wrapper prefixes, so that it is the same after a merge and a new wrap)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module.lora_A[adapter].weight
    return out


class Peer:
    """One peer on ``model`` (which it wraps, and after each task merges and re-wraps): ``net`` is the module to
    train; :meth:`regularizer` the extra loss term (O-LoRA) or None; :meth:`end_task` merges and restarts.

    ``n_tasks`` sets OSF's preserved-rank schedule; ``task_type`` is PEFT's (``"CAUSAL_LM"`` for the LLM demo,
    None for a bare encoder); the LoRA seeds follow the demos' ``20_000 + 97 * seed + task``.
    """

    def __init__(self, name: str, model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str],
                 n_tasks: int, seed: int, task_type: Optional[str] = None):
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
        self.name, self.rank, self.alpha, self.targets = name, rank, alpha, list(targets)
        self.n_tasks, self.seed, self.task_type, self.task = n_tasks, seed, task_type, 0
        self.previous: dict[str, list[torch.Tensor]] = {}  # O-LoRA: the earlier tasks' A, per layer
        self.net = self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, OSFConfig, get_peft_model

        torch.manual_seed(20_000 + 97 * self.seed + self.task)
        if self.name == "osf":
            config = OSFConfig(target_modules=self.targets, task_type=self.task_type,
                               effective_rank=osf_preserved_fraction(self.task, self.n_tasks))
        else:
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.targets, lora_dropout=0.0,
                                bias="none", task_type=self.task_type, init_lora_weights=_LORA_INIT[self.name])
        return get_peft_model(model, config)

    def end_task(self) -> nn.Module:
        """Merge the task's update into the weights and wrap them again for the next task; returns the new net."""
        if self.name == "o-lora":
            for layer, weight in lora_down_projections(self.net).items():
                self.previous.setdefault(layer, []).append(weight.detach().clone())
        self.task += 1
        merged = self.net.merge_and_unload()
        if self.task < self.n_tasks:
            self.net = self._wrap(merged)
        else:  # after the last task the model stays merged (evaluation and reports need no adapter)
            self.net = merged
        return self.net

    def regularizer(self) -> Optional[torch.Tensor]:
        """O-LoRA's ``λ1 Σ_layers L_orth + λ2 Σ ‖θ_t‖₂`` (None for the other peers and O-LoRA's first task with
        λ2 = 0)."""
        if self.name != "o-lora" or (not self.previous and OLORA_LAMBDA_L2 == 0):
            return None
        current = lora_down_projections(self.net)
        total = sum(olora_orthogonality(self.previous.get(layer, []), a) for layer, a in current.items())
        total = OLORA_LAMBDA_ORTH * total
        if OLORA_LAMBDA_L2:
            total = total + OLORA_LAMBDA_L2 * sum(p.norm() for n, p in self.net.named_parameters()
                                                   if p.requires_grad and "lora_" in n)
        return total

    def current_net_merged_copy(self) -> nn.Module:
        """A merged copy of the current model (the weights the method would serve)."""
        import copy

        net = copy.deepcopy(self.net)
        return net.merge_and_unload() if hasattr(net, "merge_and_unload") else net


_TRAINER_CLASS: dict = {}


def regularized_trainer_class():
    """A ``transformers.Trainer`` whose training loss adds ``self.regularizer()`` (a callable returning a 0-dim
    tensor or None, set on the instance) once per optimizer step, as :class:`taillor.hf_trainer.TailLoRTrainer`
    adds the spectral penalty."""
    if "cls" not in _TRAINER_CLASS:
        from transformers import Trainer

        from ..hf_trainer import TailLoRTrainer

        class RegularizedTrainer(Trainer):
            regularizer: Callable[[], Optional[torch.Tensor]] = staticmethod(lambda: None)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch, **kwargs)
                extra = self.regularizer() if model.training else None
                if extra is not None:
                    if TailLoRTrainer._loss_already_scaled_for_accumulation(self, num_items_in_batch):
                        extra = extra / self.current_gradient_accumulation_steps
                    loss = loss + extra.to(loss.dtype)
                return (loss, outputs) if return_outputs else loss

        _TRAINER_CLASS["cls"] = RegularizedTrainer
    return _TRAINER_CLASS["cls"]
