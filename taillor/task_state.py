"""A TailLoRLinear's continual-learning state in its ``state_dict``: what a plain PyTorch or Trainer checkpoint must
carry besides ``lora_A``, ``lora_B`` and the base layer (whose weight already holds the folded tasks).

Entries, under the layer's prefix: ``consolidated_up`` (d_out, R) and ``consolidated_down`` (R, d_in) in the
adapter's dtype, R = rank · tasks_consolidated; ``penalty_strength`` (0-dim, λ); ``tasks_consolidated`` (0-dim
int64); ``tasks_folded`` (0-dim int64: whether the base weight holds the finished tasks,
:mod:`taillor.base`); ``merged_up`` (d_out, M) and ``merged_down`` (M, d_in), what ``merge()`` added to the base
weight (M = 0 when not merged, r when merged, R + r when merged with unfolded tasks). Tensors only, so safetensors and ``torch.load(weights_only=True)`` read them. Without them
a checkpoint restores the outputs but forgets the finished tasks: λ restarts, ``protect_tasks`` protects nothing,
and a later ``save_adapter`` records the folded base as if it were the pre-trained one.

The shapes grow with the tasks, so a loader that fills the fresh model's tensors in place
(``torch.distributed.checkpoint``) refuses a checkpoint taken after a consolidation (a size mismatch on
``consolidated_up``): checkpoint such runs with ``save_adapter`` / ``load_adapter`` (docs/distributed.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .record import record_shapes, valid_strength

TASK_STATE = ("consolidated_up", "consolidated_down", "penalty_strength", "tasks_consolidated", "tasks_folded",
              "merged_up", "merged_down")
_FACTORS = ("consolidated_up", "consolidated_down", "merged_up", "merged_down")


def task_state(layer, prefix: str, keep_vars: bool) -> dict[str, Tensor]:
    """The entries of ``layer`` (a TailLoRLinear) for its state_dict, keyed ``prefix + name``."""
    tensors = {name: getattr(layer, name) for name in (*_FACTORS, "penalty_strength")}
    out = {prefix + name: (t if keep_vars else t.detach()) for name, t in tensors.items()}
    out[prefix + "tasks_consolidated"] = torch.tensor(layer.tasks_consolidated, dtype=torch.int64)
    out[prefix + "tasks_folded"] = torch.tensor(int(layer.base.folds_tasks), dtype=torch.int64)
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
    count, folded = found["tasks_consolidated"], found["tasks_folded"]
    if any(t.numel() != 1 or t.is_floating_point() for t in (count, folded)) or found["penalty_strength"].numel() != 1:
        error_msgs.append(f"{where}: tasks_consolidated {count.dtype} {tuple(count.shape)}, tasks_folded "
                          f"{folded.dtype} {tuple(folded.shape)} and penalty_strength "
                          f"{tuple(found['penalty_strength'].shape)} must be two integers and one number")
        return None
    tasks, folded, strength = int(count), int(folded), float(found["penalty_strength"])
    d_out, d_in, rank = layer.out_features, layer.in_features, layer.config.rank
    shapes = record_shapes({"rank": rank, "d_in": d_in, "d_out": d_out, "tasks_consolidated": tasks})
    r = (rank + (0 if folded else rank * tasks)) if found["merged_up"].shape[-1] else 0
    expected = {part: shapes[part] for part in ("consolidated_up", "consolidated_down")}
    expected.update(merged_up=(d_out, r), merged_down=(r, d_in))
    problems = [f"{name} has shape {tuple(found[name].shape)}, expected {shape}"
                for name, shape in expected.items() if tuple(found[name].shape) != shape]
    if tasks < 0 or folded not in (0, 1) or (folded and layer.base.quantized):
        problems.append(f"tasks_consolidated={tasks}, tasks_folded={folded} (a quantized base never folds)")
    if not valid_strength(strength):
        problems.append(f"penalty_strength={strength!r} is not a finite number >= 0")
    if problems:
        error_msgs.append(f"{where}: " + "; ".join(problems))
        return None
    like = layer.consolidated_up  # the adapter's dtype, the layer's device
    return {**{name: found[name].to(like).clone(memory_format=torch.contiguous_format) for name in _FACTORS},
            "penalty_strength": strength, "tasks_consolidated": tasks, "tasks_folded": bool(folded)}
