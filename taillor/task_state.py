"""A TailLoRLinear's continual-learning state in its ``state_dict``: what a plain PyTorch or Trainer checkpoint must
carry besides ``lora_A``, ``lora_B`` and the base layer (whose weight already holds the folded tasks).

Entries, under the layer's prefix: ``consolidated_up`` (d_out, R) and ``consolidated_down`` (R, d_in) in the
adapter's dtype, ``penalty_strength`` (0-dim, λ), ``tasks_consolidated`` and ``merged`` (0-dim int64); R = rank ·
tasks_consolidated. Tensors only, so safetensors and ``torch.load(weights_only=True)`` read them. Without them a
checkpoint restores the outputs but forgets the finished tasks: λ restarts, ``protect_tasks`` protects nothing, and
a later ``save_adapter`` records the folded base as if it were the pre-trained one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

TASK_STATE = ("consolidated_up", "consolidated_down", "penalty_strength", "tasks_consolidated", "merged")


def task_state(layer, prefix: str, keep_vars: bool) -> dict[str, Tensor]:
    """The entries of ``layer`` (a TailLoRLinear) for its state_dict, keyed ``prefix + name``."""
    tensors = {name: getattr(layer, name) for name in TASK_STATE[:3]}
    out = {prefix + name: (t if keep_vars else t.detach()) for name, t in tensors.items()}
    out[prefix + "tasks_consolidated"] = torch.tensor(layer.tasks_consolidated, dtype=torch.int64)
    out[prefix + "merged"] = torch.tensor(int(layer.merged), dtype=torch.int64)
    return out


def read_task_state(state_dict: dict, prefix: str, layer, unexpected_keys: list,
                    error_msgs: list) -> Optional[dict]:
    """The entries of ``layer``'s prefix in ``state_dict``, checked against the layer (rank, sizes): a dict by name
    (the factors as copies in the layer's dtype and on its device), or None when there are none (a checkpoint from
    before they existed: the layer keeps its state) or they do not fit (then a message naming the layer and the
    value goes to ``error_msgs``, and load_state_dict raises). Takes the entries off ``unexpected_keys``, where
    nn.Module's own loading put them."""
    keys = {name: prefix + name for name in TASK_STATE}
    for key in keys.values():
        if key in unexpected_keys:
            unexpected_keys.remove(key)
    found = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
    if not found:
        return None
    where = prefix.rstrip(".") or "TailLoRLinear"
    if len(found) < len(TASK_STATE):
        error_msgs.append(f"{where}: the state_dict holds {sorted(found)} of TailLoR's task state but not "
                          f"{sorted(set(TASK_STATE) - set(found))}")
        return None
    scalars = ("penalty_strength", "tasks_consolidated", "merged")
    not_scalar = [f"{name} has shape {tuple(found[name].shape)}" for name in scalars if found[name].numel() != 1]
    if not_scalar:
        error_msgs.append(f"{where}: " + "; ".join(not_scalar) + ", expected one number")
        return None
    tasks, merged = int(found["tasks_consolidated"]), int(found["merged"])
    strength = float(found["penalty_strength"])
    R = layer.config.rank * tasks
    expected = {"consolidated_up": (layer.out_features, R), "consolidated_down": (R, layer.in_features)}
    problems = [f"{name} has shape {tuple(found[name].shape)}, expected {shape}"
                for name, shape in expected.items() if tuple(found[name].shape) != shape]
    if tasks < 0 or merged not in (0, 1):
        problems.append(f"tasks_consolidated={tasks}, merged={merged}")
    if not math.isfinite(strength) or strength < 0:
        problems.append(f"penalty_strength={strength!r} is not a finite number >= 0")
    if problems:
        error_msgs.append(f"{where}: " + "; ".join(problems))
        return None
    like = layer.consolidated_up  # the adapter's dtype, the layer's device
    return {"consolidated_up": found["consolidated_up"].to(like).clone(),
            "consolidated_down": found["consolidated_down"].to(like).clone(),
            "penalty_strength": strength, "tasks_consolidated": tasks, "merged": bool(merged)}
