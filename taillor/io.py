"""Saving, loading and exporting TailLoR adapters (safetensors only, atomic writes, checked before any change).

Format (``adapter_config.json`` + ``adapter_model.safetensors``): the config, and per layer
``<name>.lora_P`` (d_in, r) and ``<name>.lora_Q`` (d_out, r) — the current adapter in layer coordinates,
ΔW = s·Q Pᵀ — plus ``<name>.consolidated_up`` (d_out, R) and ``<name>.consolidated_down`` (R, d_in), the
finished tasks. Layer coordinates make a saved adapter independent of the SVD routine's sign and basis choices:
on load, A and B are re-expressed in the frame that the loading machine computes (A = Pᵀ V, B = Uᵀ Q).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import nn

from ._version import __version__
from ._files import atomic_save_json, atomic_save_safetensors
from .config import TailLoRConfig
from .layer import TailLoRLinear, fold_delta
from .model import _require_layers, apply_taillor, find_target_modules, iter_taillor_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "taillor-adapter"
FORMAT_VERSION = 1
# The base weight a saved adapter was trained on is recognised by its Frobenius norm, to this relative error.
BASE_NORM_RTOL = 1e-3


def _common_config(layers: list[tuple[str, TailLoRLinear]]) -> TailLoRConfig:
    configs = {layer.config for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("the TailLoR layers of this model have different configs; save_adapter needs one")
    return configs.pop()


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors`` atomically.

    Saves the current adapters and every consolidated task, so that :func:`load_adapter` onto a fresh copy of the
    original base model reproduces ``model``.
    """
    layers = _require_layers(model, "save_adapter")
    config = _common_config(layers)
    tensors, meta = {}, {}
    for name, layer in layers:
        with torch.no_grad():
            P, Q = layer.adapter_factors()
        tensors[f"{name}.lora_P"] = P.detach().contiguous().cpu()
        tensors[f"{name}.lora_Q"] = Q.detach().contiguous().cpu()
        tensors[f"{name}.consolidated_up"] = layer.consolidated_up.contiguous().cpu()
        tensors[f"{name}.consolidated_down"] = layer.consolidated_down.contiguous().cpu()
        base = layer.pretrained_weight()
        meta[name] = {"d_in": layer.in_features, "d_out": layer.out_features, "rank": config.rank,
                      "tasks_consolidated": layer.tasks_consolidated, "merged": layer.merged,
                      "base_weight_norm": float(base.double().norm()),
                      "penalty_strength": float(layer.penalty_strength)}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "taillor_version": __version__,
                "config": config.to_dict(), "layers": meta}
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    atomic_save_json(document, os.path.join(directory, CONFIG_NAME))


def read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config document, tensors) of a saved adapter, validated for format; never unpickles."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no TailLoR adapter at {directory!r}: {os.path.basename(path)} is missing")
    with open(config_path, encoding="utf-8") as handle:
        document = json.load(handle)
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a taillor adapter of format version {FORMAT_VERSION} "
                         f"(format={document.get('format')!r}, version={document.get('format_version')!r})")
    return document, load_file(weights_path)


def _expected_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    r, d_in, d_out = meta["rank"], meta["d_in"], meta["d_out"]
    R = r * meta["tasks_consolidated"]
    return {"lora_P": (d_in, r), "lora_Q": (d_out, r), "consolidated_up": (d_out, R),
            "consolidated_down": (R, d_in)}


def _check_against(model_layers: dict[str, nn.Linear], document: dict, tensors: dict, config: TailLoRConfig):
    saved = document["layers"]
    if set(saved) != set(model_layers):
        missing, extra = sorted(set(saved) - set(model_layers)), sorted(set(model_layers) - set(saved))
        raise ValueError(f"adapter layers do not match the model: in the adapter only {missing[:5]}, in the model "
                         f"only {extra[:5]}")
    expected_keys = {f"{name}.{part}" for name in saved for part in _expected_shapes(saved[name])}
    if set(tensors) != expected_keys:
        raise ValueError(f"adapter tensors do not match its config: unexpected {sorted(set(tensors) - expected_keys)[:5]}"
                         f", missing {sorted(expected_keys - set(tensors))[:5]}")
    for name, linear in model_layers.items():
        meta = saved[name]
        if (linear.out_features, linear.in_features) != (meta["d_out"], meta["d_in"]):
            raise ValueError(f"{name}: the adapter was saved for a {meta['d_in']}->{meta['d_out']} layer, the model "
                             f"has {linear.in_features}->{linear.out_features}")
        if meta["rank"] != config.rank:
            raise ValueError(f"{name}: saved rank {meta['rank']} differs from the config's rank {config.rank}")
        for part, shape in _expected_shapes(meta).items():
            tensor = tensors[f"{name}.{part}"]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}.{part}: saved shape {tuple(tensor.shape)}, expected {shape}")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}.{part}: saved tensor has non-finite entries")
        strength = meta.get("penalty_strength", 0.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or strength < 0:
            raise ValueError(f"{name}: saved penalty_strength {strength!r} is not a finite number >= 0")
        norm = float(linear.weight.detach().double().norm())
        if not math.isclose(norm, meta["base_weight_norm"], rel_tol=BASE_NORM_RTOL, abs_tol=1e-12):
            raise ValueError(f"{name}: this base weight (norm {norm:.6g}) is not the one the adapter was trained on "
                             f"(norm {meta['base_weight_norm']:.6g}); load adapters onto the original base model")


def load_adapter(model: nn.Module, directory: str, config: Optional[TailLoRConfig] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` onto a fresh copy of its original base model, in place.

    Applies TailLoR first if the model has no TailLoR layers (``config`` overrides runtime-only options such as
    ``frame_cache_dir``; its shape-defining fields must equal the saved ones). Names, shapes, ranks and base
    weights are all checked before anything changes; a mismatch raises ValueError and leaves the model as it was.
    Returns ``model``.
    """
    document, tensors = read_adapter(directory)
    saved_config = TailLoRConfig.from_dict(document["config"])
    if config is not None and config.to_dict() != saved_config.to_dict():
        raise ValueError(f"the given config differs from the saved one: {config.to_dict()} != {saved_config.to_dict()}")
    config = config or saved_config
    existing = dict(iter_taillor_layers(model))
    if existing:
        for name, layer in existing.items():
            if layer.tasks_consolidated or layer.merged or layer.config.to_dict() != config.to_dict():
                raise ValueError(f"{name}: load_adapter needs fresh TailLoR layers with the saved config (or none); "
                                 "this one is merged, consolidated or configured differently")
        base_layers = {name: layer.base_layer for name, layer in existing.items()}
    else:
        base_layers = find_target_modules(model, config)
    _check_against(base_layers, document, tensors, config)
    if not existing:
        apply_taillor(model, config)
    for name, layer in iter_taillor_layers(model):
        _restore_layer(layer, document["layers"][name], tensors, name)
    return model


def _restore_layer(layer: TailLoRLinear, meta: dict, tensors: dict, name: str) -> None:
    device, dtype = layer.lora_A.device, layer.lora_A.dtype
    load = lambda part: tensors[f"{name}.{part}"].to(device=device, dtype=dtype)  # noqa: E731
    up, down = load("consolidated_up"), load("consolidated_down")
    r = meta["rank"]
    for task in range(meta["tasks_consolidated"]):
        fold_delta(layer.base_layer.weight, up[:, task * r:(task + 1) * r], down[task * r:(task + 1) * r])
    layer.consolidated_up, layer.consolidated_down = up.contiguous(), down.contiguous()
    layer.tasks_consolidated = meta["tasks_consolidated"]
    P, Q = load("lora_P"), load("lora_Q")
    with torch.no_grad():
        if layer.config.frame == "full":
            layer.lora_A.copy_(P.t() @ layer.frame.V)
            layer.lora_B.copy_(layer.frame.U.t() @ Q)
        else:
            layer.lora_A.copy_(P.t())
            layer.lora_B.copy_(Q)
    if "penalty_strength" in meta:  # adapted λ (head_share_target); absent in adapters saved before it existed
        layer.penalty_strength.fill_(float(meta["penalty_strength"]))
    if meta["merged"]:
        layer.merge()


def export_lora(model: nn.Module, directory: str) -> None:
    """Write a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(original_base, directory)``
    loads with the same outputs: per layer lora_B = [consolidated_up, s·Q] and lora_A = [consolidated_down; Pᵀ]
    (rank r·(tasks+1)), lora_alpha = rank so PEFT's scale is 1."""
    layers = _require_layers(model, "export_lora")
    tensors, ranks = {}, {}
    for name, layer in layers:
        with torch.no_grad():
            P, Q = layer.adapter_factors()
            up = torch.cat([layer.consolidated_up, layer.scaling * Q], dim=1)
            down = torch.cat([layer.consolidated_down, P.t()], dim=0)
        tensors[f"base_model.model.{name}.lora_A.weight"] = down.float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = up.float().contiguous().cpu()
        ranks[name] = down.shape[0]
    rank = max(ranks.values())
    patterns = {name: r for name, r in ranks.items() if r != rank}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path, "inference_mode": True,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": patterns, "alpha_pattern": dict(patterns),
    }
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    atomic_save_json(peft_config, os.path.join(directory, CONFIG_NAME))
