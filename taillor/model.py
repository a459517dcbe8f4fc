"""Model API: put TailLoR into any PyTorch / Hugging Face model, and the model-wide operations on it."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ._sharded import is_sharded, reshard
from .base import SUPPORTED, LinearBase, base_for, is_supported_base
from .config import TailLoRConfig
from .frame import SpectralFrame, build_frames as _build_frames, frame_bytes
from .frame.cache import cache_limit_bytes
from .frame.footprint import LayerShape, apply_footprint
from .layer import TailLoRLinear
from .penalty_groups import grouped_penalty

_OUTPUT_HEAD_NAMES = ("lm_head",)


def iter_taillor_layers(model: nn.Module) -> Iterator[tuple[str, TailLoRLinear]]:
    """(qualified name, layer) for every TailLoRLinear in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, TailLoRLinear):
            yield name, module


def require_taillor_layers(model: nn.Module, what: str) -> list[tuple[str, TailLoRLinear]]:
    """(name, layer) of every TailLoRLinear of ``model``; ValueError naming ``what`` when there is none."""
    layers = list(iter_taillor_layers(model))
    if not layers:
        raise ValueError(f"{what}: the model has no TailLoRLinear layers; call taillor.apply_taillor first")
    return layers


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in _OUTPUT_HEAD_NAMES}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads |= {name for name, module in model.named_modules() if module is output}
    return heads


def find_target_modules(model: nn.Module, config: TailLoRConfig) -> dict[str, nn.Linear]:
    """The nn.Linear modules ``config.target_modules`` selects (PEFT's conventions), by qualified name.

    Raises ValueError when nothing matches (listing the Linear layers that exist) and TypeError when a matched
    module is not an nn.Linear.
    """
    targets = config.target_modules
    if targets is None:
        raise ValueError("TailLoRConfig.target_modules is required by apply_taillor: a list of module names, a "
                         "regex, or 'all-linear'")
    inside_taillor = {name for name, _ in iter_taillor_layers(model)}
    if inside_taillor:
        raise ValueError(f"the model already has TailLoRLinear layers ({sorted(inside_taillor)[:3]}...); "
                         "call taillor.merge_and_unload first to apply a new configuration")
    linear_names = [name for name, module in model.named_modules() if is_supported_base(module)]
    if targets == "all-linear":
        heads = _output_head_names(model)
        selected = {name: module for name, module in model.named_modules()
                    if is_supported_base(module) and name not in heads}
    else:
        selected = {}
        for name, module in model.named_modules():
            if name and _matches(name, targets):
                if not is_supported_base(module):
                    raise TypeError(f"target module {name!r} is a {type(module).__name__}, not an nn.Linear; "
                                    f"TailLoR wraps {SUPPORTED} layers only")
                selected[name] = module
    if config.exclude_modules is not None:
        selected = {n: m for n, m in selected.items() if not _matches(n, config.exclude_modules)}
    if not selected:
        shown = ", ".join(linear_names[:20]) + (" ..." if len(linear_names) > 20 else "")
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear layer; the model's Linear layers are: "
                         f"{shown or '(none)'}")
    return selected


def build_frames(model: nn.Module, config: TailLoRConfig, progress: bool = True) -> dict[str, SpectralFrame]:
    """Frames of every target layer of ``model``, batched by shape (and sharded across ranks when
    torch.distributed is initialized). Reuses cached frames of unchanged weights."""
    targets = find_target_modules(model, config)
    return _frames_of({name: base_for(module, name) for name, module in targets.items()}, config, progress)


def _frames_of(bases: dict[str, LinearBase], config: TailLoRConfig, progress: bool) -> dict[str, SpectralFrame]:
    """Frames of the bases' weights: stored weights batched by shape; quantized ones dequantized one layer at a
    time (the copy is freed before the next), never the whole model at once."""
    stored = {name: base.weight() for name, base in bases.items() if not base.quantized}
    frames = _build_frames(stored, config, progress=progress) if stored else {}
    for name, base in bases.items():
        if base.quantized:
            frames[name] = _build_frames({name: base.weight()}, config)[name]
    return frames


def estimate_frame_bytes(model: nn.Module, config: TailLoRConfig) -> dict[str, int]:
    """Bytes the frame of each target layer of ``model`` would keep under ``config``, by qualified name, without
    computing any (see :func:`taillor.frame.frame_bytes`). Sum the values for the model's total."""
    targets = find_target_modules(model, config)
    bases = {name: base_for(module, name) for name, module in targets.items()}
    return {name: frame_bytes(base.out_features, base.in_features, base.dtype, config, name)
            for name, base in bases.items()}


def estimate_apply_memory(model: nn.Module, config: TailLoRConfig) -> dict[str, int]:
    """Bytes :func:`apply_taillor` would take on ``model`` under ``config`` with an empty frame cache, computed from
    the target layers' shapes without allocating anything: ``frames``, ``frame_cache`` (the in-memory cache's
    copies, up to ``TAILLOR_FRAME_CACHE_MB``), ``factors`` (A and B), ``kept`` (what applying leaves allocated) and
    ``peak`` (the most allocated at once, while the frames are built). The model's own weights are not counted.
    See :mod:`taillor.frame.footprint` for the formula and docs/quantized.md for how it compares to measurements."""
    targets = find_target_modules(model, config)
    layers = {}
    for name, module in targets.items():
        base = base_for(module, name)
        layers[name] = LayerShape(base.out_features, base.in_features, base.dtype, base.quantized)
    return apply_footprint(layers, config, cache_limit_bytes())


def _check_frame_budget(bases: dict[str, LinearBase], config: TailLoRConfig) -> None:
    """ValueError when the frames would exceed ``config.max_frame_bytes``, naming the estimate and what fits."""
    if config.max_frame_bytes is None:
        return
    total = sum(frame_bytes(b.out_features, b.in_features, b.dtype, config, name) for name, b in bases.items())
    if total <= config.max_frame_bytes:
        return
    advice = []
    if config.frame == "full":
        head = dataclasses.replace(config, frame="head", head_energy=None, max_frame_bytes=None)
        head_total = sum(frame_bytes(b.out_features, b.in_features, b.dtype, head, n) for n, b in bases.items())
        advice.append(f"frame='head' with head={config.head!r} would take {_format_bytes(head_total)}")
    else:
        advice.append("a smaller head (or head instead of head_energy, which is counted at its largest size)")
    if config.frame_dtype not in ("bfloat16", "float16"):
        advice.append("frame_dtype='bfloat16' halves a float32 frame")
    raise ValueError(f"the {config.frame} frames of {len(bases)} layers would take an estimated "
                     f"{_format_bytes(total)} ({total} bytes), more than max_frame_bytes={config.max_frame_bytes}; "
                     f"alternatives: {'; '.join(advice)}; or fewer target_modules. Nothing was changed.")


def _format_bytes(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def apply_taillor(model: nn.Module, config: TailLoRConfig, progress: bool = True) -> nn.Module:
    """Swap the target layers of ``model`` (nn.Linear, or bitsandbytes Linear4bit / Linear8bitLt) for
    TailLoRLinear, in place; freeze everything else.

    Every check (targets, ranks, the frame memory budget ``config.max_frame_bytes``, heads, finite weights) runs
    before the first swap, so an error leaves the model unchanged; the budget is checked before any frame is
    computed. Frames are built by :func:`build_frames` (a progress bar on a terminal unless progress=False); a
    quantized weight is dequantized for its frame one layer at a time. Returns ``model``.
    """
    targets = find_target_modules(model, config)
    if reshard(model):  # new layers would hold parameters that FSDP does not manage
        first = next(name for name, p in model.named_parameters() if is_sharded(p))
        raise TypeError(f"apply_taillor: the model is already sharded (FSDP2 DTensor parameter {first!r}); apply "
                        "TailLoR to the unsharded model, then call fully_shard. Nothing was changed.")
    bases = {name: base_for(module, name) for name, module in targets.items()}
    for name, base in bases.items():
        d_out, d_in = base.out_features, base.in_features
        if config.rank > min(d_out, d_in):
            raise ValueError(f"{name}: rank={config.rank} exceeds min(d_out, d_in)={min(d_out, d_in)} of a "
                             f"{d_in}->{d_out} layer")
    _check_frame_budget(bases, config)
    frames = _frames_of(bases, config, progress)
    layers = {name: TailLoRLinear(module, config, name=name, frame=frames[name]) for name, module in targets.items()}
    model.requires_grad_(False)
    for name, layer in layers.items():
        _replace_module(model, name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def spectral_penalty(model: nn.Module, penalty: float | None = None) -> torch.Tensor:
    """Σ over TailLoR layers of λ·(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²), plus with ``protect_tasks`` (the default) the finished
    tasks' term (:meth:`TailLoRLinear.spectral_penalty`): add it to the task loss yourself (never done behind your
    back). λ is each layer's strength (``config.penalty``, or its adapted λ with ``head_share_target``), or
    ``penalty`` for all layers when given (e.g. ``config.penalty``, the fixed-strength value). A 0-dim float32 tensor on the first layer's device, differentiable in every A and B.

    Same-shaped layers run as one batched call per group, dual step included (:mod:`taillor.penalty_groups`): the
    first call stacks their frames and re-points each layer's frame buffers to its slice (no second copy)."""
    layers = [layer for _, layer in require_taillor_layers(model, "spectral_penalty")]
    return grouped_penalty(model, layers, penalty, layers[0].lora_A.device)


def consolidate(model: nn.Module) -> int:
    """End a task on every TailLoR layer (fold, record, restart the adapter). Returns the number of layers.

    Optimizer state of the old A, B is stale afterwards: create a new optimizer (or reset its state).
    On a model sharded by FSDP2 every rank calls it; each layer is gathered in turn and each rank keeps its shard.
    """
    layers = require_taillor_layers(model, "consolidate")
    reshard(model)
    for _, layer in layers:
        layer.consolidate()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain nn.Linear back; returns ``model``.

    On a quantized base (bitsandbytes) it raises TypeError before changing anything: merging would requantize
    the weight and lose part of what was learned. Keep the TailLoR layers, or export a PEFT LoRA adapter for the
    same quantized base with :func:`taillor.export_lora`, or load the adapter onto an unquantized copy of the model
    and merge there. On a model sharded by FSDP2 it raises TypeError, also before any change (the module tree is
    FSDP's): save the adapter and merge an unsharded copy, or export it.
    """
    layers = require_taillor_layers(model, "merge_and_unload")
    _refuse_sharded(model, "merge_and_unload")
    quantized = [name for name, layer in layers if layer.base.quantized]
    if quantized:
        raise TypeError(f"merge_and_unload: {len(quantized)} layers have a quantized base ({quantized[:3]}...); "
                        "merging would requantize their weights and lose part of the update. Keep the TailLoR "
                        "layers, use taillor.export_lora (a PEFT LoRA adapter for the same quantized base), "
                        "taillor.load_adapter onto an unquantized copy of the model and merge that, or "
                        "taillor.merge_and_requantize (it requantizes and reports the loss). Nothing changed.")
    _merge_and_restore_bases(model, layers)
    return model


@dataclass(frozen=True)
class RequantizationError:
    """What requantizing one merged layer cost, as relative Frobenius norms. W' = W + ΔW is the exact merged weight
    (W the dequantized base, ΔW everything learned), Ŵ' the dequantized result.

    weight_error = ‖Ŵ' − W'‖ / ‖W'‖: the merged weight's quantization error.
    update_error = ‖(Ŵ' − W) − ΔW‖ / ‖ΔW‖: the part of the learned update that requantization lost or distorted
    (0: kept exactly; about 1: the update is gone, e.g. smaller than the quantization step).
    """

    weight_error: float
    update_error: float


def merge_and_requantize(model: nn.Module) -> dict[str, RequantizationError]:
    """:func:`merge_and_unload` that accepts quantized bases: each quantized layer's learned update is added to its
    dequantized weight, requantized in the layer's own format (bitsandbytes nf4/fp4, double quantization, int8)
    and the quantized layer put back. This loses part of the update: the returned report says how much, per
    quantized layer name. Unquantized layers merge exactly, as in :func:`merge_and_unload`. One layer is
    dequantized at a time. The exact alternatives: keep the TailLoR layers, or :func:`taillor.export_lora`.
    """
    layers = require_taillor_layers(model, "merge_and_requantize")
    _refuse_sharded(model, "merge_and_requantize")
    return _merge_and_restore_bases(model, layers)


def _refuse_sharded(model: nn.Module, what: str) -> None:
    """TypeError on a model sharded by FSDP2: putting the base layers back in place of the TailLoR layers changes
    the module tree whose parameters FSDP manages."""
    if reshard(model):  # after a forward without backward, FSDP2 may hold plain unsharded copies: look at the shards
        raise TypeError(f"{what}: the model is sharded (FSDP2 DTensor parameters); replacing its TailLoR layers "
                        "would leave FSDP managing modules that are gone. Save the adapter (taillor.save_adapter "
                        "works on the sharded model), load it onto an unsharded copy of the base model and merge "
                        "there, or use taillor.export_lora; layer.merge() merges in place, sharded. Nothing "
                        "was changed.")


def _merge_and_restore_bases(model: nn.Module, layers) -> dict[str, RequantizationError]:
    """Each TailLoR layer's learned update goes into its base (exactly into a float weight, requantized into a
    quantized one) and the base layer takes the TailLoR layer's place; the requantization report, per layer name."""
    report = {}
    for name, layer in layers:
        if layer.base.quantized:
            report[name] = _requantize_merged(layer)
        else:
            layer.merge()
        _replace_module(model, name, layer.base_layer)
    return report


@torch.no_grad()
def _requantize_merged(layer: TailLoRLinear) -> RequantizationError:
    before = layer.base.weight().float()
    delta = layer.learned_delta().float()
    target = before + delta
    layer.base.requantize(target)
    after = layer.base.weight().float()
    return RequantizationError(weight_error=float((after - target).norm() / target.norm().clamp_min(1e-30)),
                               update_error=float((after - before - delta).norm() / delta.norm().clamp_min(1e-30)))


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int
    taillor_layers: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
                f"{100 * self.share:.4f} || TailLoR layers: {self.taillor_layers}")


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Counts of trainable and all parameters (frames are buffers and not counted)."""
    params = list(model.parameters())
    return TrainableSummary(trainable=sum(p.numel() for p in params if p.requires_grad),
                            total=sum(p.numel() for p in params),
                            taillor_layers=len(list(iter_taillor_layers(model))))
