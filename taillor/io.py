"""Saving, loading and exporting TailLoR adapters (safetensors only, atomic writes, checked before any change).

Format (``adapter_config.json`` + ``adapter_model.safetensors``): the config and, per layer, the record the layer
exports (:meth:`TailLoRLinear.export_record`): its tensors stored as ``<name>.<part>`` (``lora_P`` (d_in, r) and
``lora_Q`` (d_out, r) — the current adapter in layer coordinates, ΔW = s·Q Pᵀ — ``consolidated_up`` (d_out, R)
and ``consolidated_down`` (R, d_in), the finished tasks) and its meta under ``layers.<name>`` in the JSON, which
also holds ``weights_sha256``, the digest of the weights file it was saved with (written last: a save cut off
between the two files is refused on load instead of mixing two saves). Layer
coordinates make a saved adapter independent of the SVD routine's sign and basis choices: on load, each layer
re-expresses A and B in the frame that the loading machine computes. This module only serializes: what a record
holds, how it is checked and how it is restored is the layer's (:mod:`taillor.layer`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from torch import nn

from ._version import __version__
from ._files import atomic_save_json, atomic_save_safetensors
from ._sharded import local_device, reshard, write_once
from .config import TailLoRConfig
from .layer import TailLoRLinear
from .model import apply_taillor, find_target_modules, iter_taillor_layers, require_taillor_layers
from .record import RECORD_TENSORS, check_record

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "taillor-adapter"
FORMAT_VERSION = 1
# What each layer's meta must hold for the record to be checked and restored (see TailLoRLinear.export_record).
_META_KEYS = frozenset({"d_in", "d_out", "rank", "tasks_consolidated", "merged", "base_weight_norm"})


class AdapterFileError(ValueError):
    """A saved adapter's file cannot be read (truncated, corrupt, not what its name says); names the file."""


def _common_config(layers: list[tuple[str, TailLoRLinear]]) -> TailLoRConfig:
    configs = {layer.config for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("the TailLoR layers of this model have different configs; save_adapter needs one")
    return configs.pop()


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors`` atomically.

    Saves the current adapters and every consolidated task, so that :func:`load_adapter` onto a fresh copy of the
    original base model reproduces ``model``. On a model sharded by FSDP2 every rank calls it: each layer is
    gathered in turn, rank 0 writes, and every rank returns once the files exist (or raises if rank 0 failed).
    """
    layers = require_taillor_layers(model, "save_adapter")
    config = _common_config(layers)
    sharded = reshard(model)
    tensors, meta = {}, {}
    for name, layer in layers:
        record_tensors, meta[name] = layer.export_record()
        tensors.update({f"{name}.{part}": tensor for part, tensor in record_tensors.items()})
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "taillor_version": __version__,
                "config": config.to_dict(), "layers": meta}

    def write() -> None:
        os.makedirs(directory, exist_ok=True)
        digest = atomic_save_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
        # The config, written last, names the weights it belongs to: a save cut between the two files is detected.
        atomic_save_json(dict(document, weights_sha256=digest), os.path.join(directory, CONFIG_NAME))
    write_once(sharded, local_device(model), write)


def read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config document, tensors) of a saved adapter, validated for format; never unpickles. FileNotFoundError when
    a file is missing; :class:`AdapterFileError` (a ValueError naming the file) when one is truncated, corrupt or
    not a taillor adapter."""
    from safetensors.torch import load
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no TailLoR adapter at {directory!r}: {os.path.basename(path)} is missing")
    try:
        with open(config_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{config_path}: not a readable adapter config ({err})") from None
    if not isinstance(document, dict):
        raise AdapterFileError(f"{config_path}: not a readable adapter config (a JSON {type(document).__name__}, "
                               "not an object)")
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{config_path} is not a taillor adapter of format version {FORMAT_VERSION} "
                               f"(format={document.get('format')!r}, version={document.get('format_version')!r})")
    layers = document.get("layers")
    if not isinstance(document.get("config"), dict) or not isinstance(layers, dict) or not all(
            isinstance(meta, dict) and _META_KEYS <= set(meta) for meta in layers.values()):
        raise AdapterFileError(f"{config_path}: the adapter config is incomplete (needs 'config' and, per layer, "
                               f"{sorted(_META_KEYS)})")
    with open(weights_path, "rb") as handle:
        data = handle.read()
    digest = document.get("weights_sha256")  # absent in adapters saved before it existed
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise AdapterFileError(f"{weights_path} is not the weights file {config_path} was saved with (SHA-256 "
                               "differs): a save was cut off between its two files, or one was copied over; save "
                               "the adapter again")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise AdapterFileError(f"{weights_path}: truncated or corrupt safetensors file "
                               f"({type(err).__name__}: {err})") from None
    return document, tensors


def _check_against(model_layers: dict[str, nn.Module], document: dict, tensors: dict, config: TailLoRConfig):
    saved = document["layers"]
    if set(saved) != set(model_layers):
        missing, extra = sorted(set(saved) - set(model_layers)), sorted(set(model_layers) - set(saved))
        raise ValueError(f"adapter layers do not match the model: in the adapter only {missing[:5]}, in the model "
                         f"only {extra[:5]}")
    expected_keys = {f"{name}.{part}" for name in saved for part in RECORD_TENSORS}
    if set(tensors) != expected_keys:
        raise ValueError(f"adapter tensors do not match its config: unexpected {sorted(set(tensors) - expected_keys)[:5]}"
                         f", missing {sorted(expected_keys - set(tensors))[:5]}")
    for name, base_layer in model_layers.items():
        check_record(name, base_layer, _record_tensors(tensors, name), saved[name], config)


def _record_tensors(tensors: dict, name: str) -> dict:
    """The record tensors of layer ``name``, by part."""
    return {part: tensors[f"{name}.{part}"] for part in RECORD_TENSORS}


def load_adapter(model: nn.Module, directory: str, config: Optional[TailLoRConfig] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` onto a fresh copy of its original base model, in place.

    Applies TailLoR first if the model has no TailLoR layers (``config`` overrides runtime-only options such as
    ``frame_cache_dir``; its shape-defining fields must equal the saved ones). Names, shapes, ranks and base
    weights are all checked before anything changes; a mismatch raises ValueError and leaves the model as it was.
    On a model sharded by FSDP2 (TailLoR applied before ``fully_shard``) every rank calls it and reads the files;
    each rank sets its own shards. Returns ``model``.
    """
    document, tensors = read_adapter(directory)
    saved_config = TailLoRConfig.from_dict(document["config"])
    if config is not None and config.to_dict() != saved_config.to_dict():
        raise ValueError(f"the given config differs from the saved one: {config.to_dict()} != {saved_config.to_dict()}")
    config = config or saved_config
    existing = dict(iter_taillor_layers(model))
    reshard(model)
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
        layer.load_record(_record_tensors(tensors, name), document["layers"][name])
    return model


def export_lora(model: nn.Module, directory: str) -> None:
    """Write a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(original_base, directory)``
    loads with the same outputs: per layer lora_B = [consolidated_up, s·Q] and lora_A = [consolidated_down; Pᵀ]
    (rank r·(tasks+1)), lora_alpha = rank so PEFT's scale is 1. On a model sharded by FSDP2 every rank calls it;
    rank 0 writes, as :func:`save_adapter`."""
    layers = require_taillor_layers(model, "export_lora")
    sharded = reshard(model)
    tensors, ranks = {}, {}
    for name, layer in layers:
        current_up, current_down = layer.current_factors()
        up = torch.cat([layer.consolidated_up, current_up], dim=1)
        down = torch.cat([layer.consolidated_down, current_down], dim=0)
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

    def write() -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_save_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        atomic_save_json(peft_config, os.path.join(directory, CONFIG_NAME))
    write_once(sharded, local_device(model), write)
